// Accounts (admins): who may sign in, with which role; create, disable or
// enable, reset a password, delete. The server refuses to remove the last
// enabled admin and says so; its `detail` is shown as is.

import { h, formatDate, replace } from '../dom.js';
import { authedCall } from '../session.js';

const USERNAME = /^[a-z0-9][a-z0-9_.-]{0,63}$/;

export async function render(main, { me }) {
  const container = h('div', { class: 'container' });
  const status = h('div', { role: 'status', id: 'accounts-status', 'aria-live': 'polite' });
  const error = h('div', { class: 'alert alert-error', role: 'alert', id: 'accounts-error' });
  const tableBody = h('tbody', {});
  replace(main, container);

  if (!me || me.role !== 'admin') {
    replace(container, h('h1', {}, 'Accounts'), h('div', { class: 'alert alert-info' }, 'Only an admin can manage accounts.'));
    return;
  }

  async function act(what, request) {
    replace(error);
    replace(status);
    try {
      await request();
      replace(status, h('p', { class: 'alert alert-ok' }, what));
      await refresh();
    } catch (err) {
      replace(error, err.message);
    }
  }

  async function refresh() {
    const accounts = await authedCall('/api/v1/accounts');
    replace(tableBody, accounts.map((account) => {
      const path = `/api/v1/accounts/${encodeURIComponent(account.username)}`;
      return h('tr', { dataset: { username: account.username } },
        h('td', {}, account.username, account.username === me.username ? ' (you)' : ''),
        h('td', {}, account.role),
        h('td', {}, account.disabled ? 'Disabled' : 'Active'),
        h('td', {}, account.last_login_at ? formatDate(account.last_login_at) : 'Never'),
        h('td', { class: 'actions' },
          h('button', {
            type: 'button',
            class: 'btn btn-sm',
            'aria-label': `${account.disabled ? 'Enable' : 'Disable'} ${account.username}`,
            onclick: () => act(`${account.username} is ${account.disabled ? 'enabled' : 'disabled'}.`,
              () => authedCall(path, { method: 'PATCH', json: { disabled: !account.disabled } })),
          }, account.disabled ? 'Enable' : 'Disable'),
          h('button', {
            type: 'button',
            class: 'btn btn-sm',
            'aria-label': `Reset the password of ${account.username}`,
            onclick: () => {
              const password = window.prompt(`New password for ${account.username} (at least 8 characters):`);
              if (password === null) return;
              if (password.length < 8) { replace(error, 'The password needs at least 8 characters.'); return; }
              act(`The password of ${account.username} is reset; their sessions have ended.`,
                () => authedCall(path, { method: 'PATCH', json: { password } }));
            },
          }, 'Reset password'),
          h('button', {
            type: 'button',
            class: 'btn btn-sm btn-danger',
            'aria-label': `Delete ${account.username}`,
            onclick: () => {
              if (!window.confirm(`Delete the account ${account.username}? Its preferences are deleted too.`)) return;
              act(`${account.username} is deleted.`, () => authedCall(path, { method: 'DELETE' }));
            },
          }, 'Delete')));
    }));
  }

  const username = h('input', { id: 'new-username', name: 'username', type: 'text', autocomplete: 'off', autocapitalize: 'none', spellcheck: 'false', required: true, 'aria-describedby': 'new-username-hint' });
  const password = h('input', { id: 'new-password', name: 'password', type: 'password', autocomplete: 'new-password', required: true, minlength: 8 });
  const role = h('select', { id: 'new-role', name: 'role' }, h('option', { value: 'user' }, 'User'), h('option', { value: 'admin' }, 'Admin'));
  const form = h('form', {
    novalidate: true,
    onsubmit: (event) => {
      event.preventDefault();
      const name = username.value.trim();
      if (!USERNAME.test(name)) { replace(error, 'The username is 1–64 characters of a-z 0-9 _ . - and starts with a letter or digit.'); return; }
      if (password.value.length < 8) { replace(error, 'The password needs at least 8 characters.'); return; }
      act(`${name} can sign in now.`, async () => {
        await authedCall('/api/v1/accounts', { method: 'POST', json: { username: name, password: password.value, role: role.value } });
        username.value = '';
        password.value = '';
      });
    },
  },
  h('div', { class: 'field' }, h('label', { for: 'new-username' }, 'Username'), username,
    h('p', { class: 'hint', id: 'new-username-hint' }, 'Lower-case letters, digits, _ . - (1–64).')),
  h('div', { class: 'field' }, h('label', { for: 'new-password' }, 'Password'), password),
  h('div', { class: 'field' }, h('label', { for: 'new-role' }, 'Role'), role),
  h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'btn btn-primary' }, 'Create account')));

  replace(container,
    h('h1', {}, 'Accounts'),
    h('p', { class: 'hint' }, 'People sign in with these accounts. Admins manage accounts; the last enabled admin cannot be removed.'),
    status,
    error,
    h('section', { class: 'card' },
      h('div', { class: 'table-wrap' },
        h('table', { class: 'table', id: 'accounts-table' },
          h('thead', {}, h('tr', {}, ['Username', 'Role', 'State', 'Last sign-in', 'Actions'].map((t) => h('th', { scope: 'col' }, t)))),
          tableBody))),
    h('section', { class: 'card' }, h('h2', {}, 'New account'), form));
  try {
    await refresh();
  } catch (err) {
    replace(error, err.message);
  }
}
