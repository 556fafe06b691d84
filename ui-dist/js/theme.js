// Light/dark theme, kept through the preferences API: the signed-in
// account's (every tab and device), or the anonymous tab session's.
//
// js/boot.js applies the value cached in sessionStorage before first paint;
// loadTheme() then confirms it from the server, which is the source of truth
// (a cleared cache or a new page load in the same tab still finds it there).

import { getPreference, setPreference } from './session.js';

const CACHE = 'omni.theme';
const PREF = 'theme';

export function currentTheme() {
  const set = document.documentElement.dataset.theme;
  if (set === 'light' || set === 'dark') return set;
  return window.matchMedia && window.matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light';
}

function apply(theme) {
  document.documentElement.dataset.theme = theme;
  sessionStorage.setItem(CACHE, theme);
  window.dispatchEvent(new CustomEvent('omni:theme', { detail: theme }));
}

/** Applies the theme stored for this session, if any. */
export async function loadTheme() {
  try {
    const stored = await getPreference(PREF);
    if (stored === 'light' || stored === 'dark') {
      apply(stored);
    } else {
      delete document.documentElement.dataset.theme;
      sessionStorage.removeItem(CACHE);
    }
  } catch {
    // The server is unreachable: keep what the cache gave us.
  }
}

/** Switches to `theme` now and stores it for the session. */
export async function setTheme(theme) {
  apply(theme);
  await setPreference(PREF, theme);
}

export async function toggleTheme() {
  await setTheme(currentTheme() === 'dark' ? 'light' : 'dark');
}
