// The application shell: routes, the top bar, and who may see which page.
//
// Routing uses the History API; the server answers index.html for every
// non-API path, so /login, /setup, /backups, /status, /logs and /import survive a reload.
// A page module exports `render(main, ctx)` and may return a cleanup
// function, called before the next page renders (the status page closes its
// event stream there).

import { call } from './api.js';
import { h, replace } from './dom.js';
import { logout, logoutEverywhere, whoAmI } from './session.js';
import { currentTheme, loadTheme, toggleTheme } from './theme.js';
import * as dashboard from './pages/dashboard.js';
import * as login from './pages/login.js';
import * as setup from './pages/setup.js';
import * as backups from './pages/backups.js';
import * as status from './pages/status.js';
import * as importPage from './pages/import.js';
import * as accounts from './pages/accounts.js';
import * as logs from './pages/logs.js';

const routes = {
  '/': { page: dashboard, title: 'Dashboard', nav: true },
  '/status': { page: status, title: 'Status', nav: true },
  // admin: only an admin (or the API key) may open it; the server refuses
  // others (README "Who may do what"), so a `user` is not offered it.
  '/logs': { page: logs, title: 'Logs', nav: true, admin: true },
  '/backups': { page: backups, title: 'Backups', nav: true, admin: true },
  '/setup': { page: setup, title: 'Setup', nav: true, public: true },
  // Reached from the dashboard's notice when an old database is found.
  '/import': { page: importPage, title: 'Import', nav: false, admin: true },
  // Admins only (the server refuses others): linked from the account menu.
  '/accounts': { page: accounts, title: 'Accounts', nav: false, admin: true },
  '/login': { page: login, title: 'Sign in', public: true, bare: true },
};

const main = document.getElementById('main');
const topbar = document.getElementById('topbar');
let cleanup = null;
let renderCount = 0;

/** Goes to `path` without reloading the page. */
export function navigate(path, { replace: replaceEntry = false } = {}) {
  if (replaceEntry) history.replaceState(null, '', path);
  else history.pushState(null, '', path);
  render();
}

async function setupStatus() {
  try {
    return await call('/api/v1/setup/status');
  } catch {
    return null;
  }
}

function themeButton() {
  const label = () => (currentTheme() === 'dark' ? 'Light theme' : 'Dark theme');
  const button = h('button', {
    type: 'button',
    class: 'btn btn-sm',
    id: 'theme-toggle',
    'aria-pressed': String(currentTheme() === 'dark'),
    onclick: async () => {
      try {
        await toggleTheme();
      } catch (error) {
        showToast(`The theme could not be saved: ${error.message}`);
      }
    },
  }, label());
  window.addEventListener('omni:theme', () => {
    button.textContent = label();
    button.setAttribute('aria-pressed', String(currentTheme() === 'dark'));
  });
  return button;
}

/** The account menu: who is signed in, Accounts for admins, signing out here or everywhere. */
function accountMenu(me) {
  const name = me.username || 'API key';
  const close = (details) => details.removeAttribute('open');
  // A menu item that ends this session (or all of the account's) and goes to the sign-in page.
  const signOutItem = (label, end) => h('button', {
    type: 'button',
    class: 'btn btn-sm',
    role: 'menuitem',
    onclick: async () => {
      close(menu);
      await end().catch(() => {});
      navigate('/login');
    },
  }, label);
  const menu = h('details', { class: 'account-menu', id: 'account-menu' },
    h('summary', { class: 'btn btn-sm', 'aria-label': `Account: ${name}` }, name),
    h('div', { class: 'account-menu-items', role: 'menu' },
      h('p', { class: 'hint' }, me.username ? `Signed in as ${me.username} (${me.role})` : 'Signed in with the API key'),
      me.role === 'admin' ? h('a', { href: '/accounts', role: 'menuitem', onclick: () => close(menu) }, 'Accounts') : null,
      signOutItem('Sign out', logout),
      signOutItem('Sign out everywhere', logoutEverywhere)));
  return menu;
}

function renderTopbar(path, signedIn) {
  const links = Object.entries(routes)
    .filter(([, route]) => route.nav && !(route.admin && signedIn && signedIn.role !== 'admin'))
    .map(([href, route]) => h('a', { href, 'aria-current': href === path ? 'page' : false }, route.title));
  replace(topbar,
    h('a', { class: 'brand', href: '/' }, h('span', { class: 'brand-mark', 'aria-hidden': 'true' }), 'Omni'),
    signedIn ? h('nav', { class: 'nav', 'aria-label': 'Main' }, links) : null,
    h('div', { class: 'topbar-actions' },
      themeButton(),
      signedIn ? accountMenu(signedIn) : null));
  topbar.hidden = false;
}

function showToast(message) {
  const region = document.getElementById('toast') || document.body.appendChild(
    h('div', { id: 'toast', class: 'container', role: 'alert' }));
  replace(region, h('p', { class: 'alert alert-error' }, message));
}

async function render() {
  const mine = ++renderCount;
  if (cleanup) {
    try { cleanup(); } catch { /* a page's cleanup must not break navigation */ }
    cleanup = null;
  }
  const path = location.pathname.replace(/\/+$/, '') || '/';
  const route = routes[path];
  if (!route) {
    renderTopbar(path, await whoAmI().catch(() => null));
    replace(main, h('div', { class: 'container narrow' },
      h('h1', { tabindex: '-1' }, 'Page not found'),
      h('p', {}, 'There is no page at ', h('code', {}, path), '.'),
      h('a', { class: 'btn', href: '/' }, 'Go to the dashboard')));
    return;
  }

  const [me, setupState] = await Promise.all([whoAmI().catch(() => null), setupStatus()]);
  if (mine !== renderCount) return;
  if (!route.public && !me) {
    // First run goes to onboarding; otherwise the user signs in.
    navigate(setupState && setupState.requires_setup ? '/setup' : '/login', { replace: true });
    return;
  }
  document.title = `${route.title} · Omni`;
  if (route.bare) {
    topbar.hidden = true;
    topbar.replaceChildren();
  } else {
    renderTopbar(path, me);
  }
  main.replaceChildren();
  if (route.admin && me && me.role !== 'admin') {
    replace(main, h('div', { class: 'container narrow' },
      h('h1', { tabindex: '-1' }, route.title),
      h('div', { class: 'alert alert-info', role: 'status' }, `Only an admin may open ${route.title}. You are signed in as ${me.username} (${me.role}).`),
      h('a', { class: 'btn', href: '/' }, 'Go to the dashboard')));
    return;
  }
  const ctx = { navigate, me, setup: setupState, notice: signedOutNotice };
  signedOutNotice = null;
  const result = await route.page.render(main, ctx);
  if (mine !== renderCount) {
    if (typeof result === 'function') result();
    return;
  }
  cleanup = typeof result === 'function' ? result : null;
  // Move focus to the page heading so keyboard and screen-reader users land on the new page.
  const heading = main.querySelector('h1');
  if (heading && renderCount > 1) {
    heading.setAttribute('tabindex', '-1');
    heading.focus({ preventScroll: true });
  }
}

// Same-origin links navigate inside the app.
document.addEventListener('click', (event) => {
  const link = event.target.closest('a[href]');
  if (!link || link.target || link.hasAttribute('download') || event.defaultPrevented) return;
  if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  const url = new URL(link.href, location.href);
  if (url.origin !== location.origin || url.pathname.startsWith('/api/')) return;
  if (url.hash && url.pathname === location.pathname) return;
  event.preventDefault();
  navigate(url.pathname + url.search);
});

window.addEventListener('popstate', render);
// Finishing onboarding signs the tab in: show the navigation at once.
window.addEventListener('omni:signed-in', (event) => {
  loadTheme();
  const route = routes[location.pathname.replace(/\/+$/, '') || '/'];
  if (route && !route.bare) renderTopbar(location.pathname, event.detail);
});
// Why the last sign-out happened, shown once on the sign-in page.
let signedOutNotice = null;

window.addEventListener('omni:signed-out', (event) => {
  signedOutNotice = event.detail || null;
  loadTheme();
  if (location.pathname !== '/login' && location.pathname !== '/setup') navigate('/login', { replace: true });
});

loadTheme();
render();
