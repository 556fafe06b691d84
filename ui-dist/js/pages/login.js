// Sign in with the API key. The key is checked against a protected endpoint
// before it is kept; a refused key shows the API's reason and stays here.

import { call } from '../api.js';
import { h, replace } from '../dom.js';
import { login } from '../session.js';

export async function render(main, { navigate, setup }) {
  const error = h('div', { class: 'alert alert-error', id: 'login-error', role: 'alert', 'aria-live': 'assertive' });
  const input = h('input', {
    id: 'api-key',
    name: 'api-key',
    type: 'password',
    autocomplete: 'off',
    spellcheck: 'false',
    required: true,
    'aria-describedby': 'api-key-hint',
  });
  const submit = h('button', { type: 'submit', class: 'btn btn-primary' }, 'Sign in');
  const firstRun = h('div', { id: 'first-run' });

  const form = h('form', {
    novalidate: true,
    onsubmit: async (event) => {
      event.preventDefault();
      replace(error);
      input.removeAttribute('aria-invalid');
      submit.disabled = true;
      submit.textContent = 'Checking…';
      try {
        await login(input.value);
        navigate('/');
      } catch (err) {
        replace(error, err.message);
        input.setAttribute('aria-invalid', 'true');
        input.focus();
        input.select();
      } finally {
        submit.disabled = false;
        submit.textContent = 'Sign in';
      }
    },
  },
  h('div', { class: 'field' },
    h('label', { for: 'api-key' }, 'API key'),
    input,
    h('p', { class: 'hint', id: 'api-key-hint' },
      'The key set in OMNI_API_KEY, or the one Omni generated and printed in its log on first start.')),
  error,
  h('div', { class: 'actions' }, submit));

  replace(main, h('div', { class: 'center-page' },
    h('section', { class: 'card auth-card', 'aria-labelledby': 'login-title' },
      h('div', { class: 'brand' }, h('span', { class: 'brand-mark', 'aria-hidden': 'true' }), 'Omni'),
      h('h1', { id: 'login-title' }, 'Sign in'),
      h('p', { class: 'hint' }, 'Enter the API key of this Omni installation.'),
      firstRun,
      form)));
  input.focus();

  // On first run the generated key is readable without a key: offer it.
  if (setup && setup.requires_setup) {
    try {
      const { api_key: generated } = await call('/api/v1/setup/api-key');
      if (generated) {
        replace(firstRun, h('div', { class: 'alert alert-info' },
          h('strong', {}, 'First run'),
          h('p', {}, 'Setup is not complete yet, so this installation\'s API key can be shown here.'),
          h('div', { class: 'actions' },
            h('button', {
              type: 'button',
              class: 'btn btn-sm',
              onclick: () => { input.value = generated; input.focus(); },
            }, 'Use this installation\'s key'),
            h('a', { class: 'btn btn-sm', href: '/setup' }, 'Start setup'))));
      }
    } catch {
      // Setup completed meanwhile, or the server is down: the form still works.
    }
  }
}
