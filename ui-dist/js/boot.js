// Applies the theme cached for this tab before the first paint, so a reload
// never flashes the other theme; js/theme.js confirms it from the
// preferences API afterwards. Nothing is read from localStorage.
//
// A classic (blocking) script loaded from index.html's <head> before the
// stylesheet: the Content-Security-Policy allows no inline script, so this
// cannot live in the page itself.
try {
  var t = sessionStorage.getItem('omni.theme');
  if (t === 'light' || t === 'dark') document.documentElement.dataset.theme = t;
} catch (e) { /* storage disabled: the system theme applies */ }
