// Sign in with a username and password, or ("Use an API key instead") with
// the installation's API key, the old way. Either opens a session cookie;
// nothing typed here is kept in the browser. A refusal shows the API's
// reason (429: how long to wait) and stays here.

import { h, replace } from '../dom.js';
import { login, loginWithKey } from '../session.js';

export async function render(main, { navigate, setup, notice }) {
  const error = h('div', { class: 'alert alert-error', id: 'login-error', role: 'alert', 'aria-live': 'assertive' });
  const firstRun = h('div', { id: 'first-run' });
  const fields = h('div', {});
  const submit = h('button', { type: 'submit', class: 'btn btn-primary' }, 'Sign in');
  const switchMode = h('button', { type: 'button', class: 'btn', id: 'switch-mode' });
  let mode = 'password';
  let inputs = {};

  function field(id, label, attrs, hint) {
    const input = h('input', { id, name: id, spellcheck: 'false', required: true, ...attrs, ...(hint ? { 'aria-describedby': `${id}-hint` } : {}) });
    inputs[id] = input;
    return h('div', { class: 'field' },
      h('label', { for: id }, label),
      input,
      hint ? h('p', { class: 'hint', id: `${id}-hint` }, hint) : null);
  }

  function showMode(next) {
    mode = next;
    inputs = {};
    replace(error);
    if (mode === 'password') {
      replace(fields,
        field('username', 'Username', { type: 'text', autocomplete: 'username', autocapitalize: 'none' }),
        field('password', 'Password', { type: 'password', autocomplete: 'current-password' }));
      switchMode.textContent = 'Use an API key instead';
      inputs.username.focus();
    } else {
      replace(fields, field('api-key', 'API key', { type: 'password', autocomplete: 'off' },
        'The key set in OMNI_API_KEY, or the one Omni generated and printed in its log on first start.'));
      switchMode.textContent = 'Use a username and password';
      inputs['api-key'].focus();
    }
  }
  switchMode.addEventListener('click', () => showMode(mode === 'password' ? 'key' : 'password'));

  const form = h('form', {
    novalidate: true,
    onsubmit: async (event) => {
      event.preventDefault();
      replace(error);
      for (const input of Object.values(inputs)) input.removeAttribute('aria-invalid');
      submit.disabled = true;
      submit.textContent = 'Checking…';
      try {
        if (mode === 'password') await login(inputs.username.value, inputs.password.value);
        else await loginWithKey(inputs['api-key'].value);
        navigate('/');
      } catch (err) {
        replace(error, err.message);
        const focus = mode === 'password' ? inputs.password : inputs['api-key'];
        for (const input of Object.values(inputs)) input.setAttribute('aria-invalid', 'true');
        focus.value = '';
        focus.focus();
      } finally {
        submit.disabled = false;
        submit.textContent = 'Sign in';
      }
    },
  }, fields, error, h('div', { class: 'actions' }, submit, switchMode));

  replace(main, h('div', { class: 'center-page' },
    h('section', { class: 'card auth-card', 'aria-labelledby': 'login-title' },
      h('div', { class: 'brand' }, h('span', { class: 'brand-mark', 'aria-hidden': 'true' }), 'Omni'),
      h('h1', { id: 'login-title' }, 'Sign in'),
      notice ? h('div', { class: 'alert alert-info', id: 'login-notice', role: 'status' }, notice) : null,
      h('p', { class: 'hint' }, 'Sign in with your Omni account. Scripts and API clients can use the API key instead.'),
      firstRun,
      form)));
  showMode('password');

  // On first run there is no account yet: point to onboarding.
  if (setup && setup.requires_setup) {
    replace(firstRun, h('div', { class: 'alert alert-info' },
      h('strong', {}, 'First run'),
      h('p', {}, 'Setup is not complete yet: create the admin account during setup, or sign in with the API key.'),
      h('div', { class: 'actions' }, h('a', { class: 'btn btn-sm', href: '/setup' }, 'Start setup'))));
  }
}
