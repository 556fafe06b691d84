//! Secrets never reach a log line or a status document: the password in a
//! connection URL is shown as `***`, and so is the value after the word
//! `password` in any case (`password=…`, `PGPASSWORD=…`, `password: …`,
//! `PASSWORD '…'`), quoted or not.

use std::borrow::Cow;

/// Whether `text` holds `password` in any case.
pub fn mentions_password(text: &str) -> bool {
    text.as_bytes().windows(8).any(|w| w.eq_ignore_ascii_case(b"password"))
}

/// Every value given to a `password` (any case, any prefix such as
/// `PG`) replaced by `***`: after `=` or `:` up to a space or separator,
/// or a quoted value whole (`password='s3cret'` → `password=***`,
/// `PASSWORD 'x y'` → `PASSWORD ***`, `"password":"x"` → `"password":***`).
/// The word without a value (`the password is wrong`) stays.
pub fn password_values(text: &str) -> Cow<'_, str> {
    if !mentions_password(text) {
        return Cow::Borrowed(text);
    }
    // ASCII lower-casing keeps every byte offset.
    let lower = text.to_ascii_lowercase();
    let b = text.as_bytes();
    let skip_spaces = |mut i: usize| {
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        i
    };
    let mut out = String::with_capacity(text.len());
    let (mut copied, mut search) = (0, 0);
    while let Some(found) = lower[search..].find("password") {
        let mut j = search + found + "password".len();
        search = j;
        // The closing quote of a quoted key: `"password": …`.
        if j < b.len() && matches!(b[j], b'"' | b'\'') && matches!(b.get(skip_spaces(j + 1)), Some(b'=' | b':')) {
            j += 1;
        }
        j = skip_spaces(j);
        let separated = matches!(b.get(j), Some(b'=' | b':'));
        if separated {
            j = skip_spaces(j + 1);
        }
        let end = match b.get(j) {
            Some(&quote @ (b'\'' | b'"')) => closing_quote(b, j + 1, quote),
            Some(_) if separated => b[j..].iter().position(|c| c.is_ascii_whitespace() || b",;&)}]\"'".contains(c)).map_or(b.len(), |p| j + p),
            _ => continue,
        };
        if end == j {
            continue;
        }
        out.push_str(&text[copied..j]);
        out.push_str("***");
        copied = end;
        search = end;
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// Just past the quote that closes a value opened before `from`: SQL's
/// doubled `''` and a backslash escape do not close it; the end of the
/// text does.
fn closing_quote(b: &[u8], from: usize, quote: u8) -> usize {
    let mut k = from;
    while k < b.len() {
        match b[k] {
            b'\\' => k += 2,
            c if c == quote && b.get(k + 1) == Some(&quote) => k += 2,
            c if c == quote => return k + 1,
            _ => k += 1,
        }
    }
    b.len()
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
///
/// The credentials end at the last `@` before any query string, so a
/// password that itself holds `@` or `/` (written unencoded, as people do)
/// is still hidden whole.
pub fn url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let before_query = rest.find('?').unwrap_or(rest.len());
    let Some(at) = rest[..before_query].rfind('@') else { return url.to_owned() };
    let (userinfo, host) = rest.split_at(at);
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::{password_values, url_password};

    #[test]
    fn hides_password_values_quoted_or_not_in_any_case() {
        for (text, want) in [
            ("conninfo host=x password=hunter22 user=y", "conninfo host=x password=*** user=y"),
            ("password='s3cret' user=y", "password=*** user=y"),
            ("ALTER ROLE omni PASSWORD 's3 cr''et' LOGIN", "ALTER ROLE omni PASSWORD *** LOGIN"),
            (r#"{"password":"a\"b","x":1}"#, r#"{"password":***,"x":1}"#),
            ("ALTER ROLE omni WITH PASSWORD 'x';", "ALTER ROLE omni WITH PASSWORD ***;"),
            ("PGPASSWORD=abc psql", "PGPASSWORD=*** psql"),
            (r#"{"password": "p w", "user": "a"}"#, r#"{"password": ***, "user": "a"}"#),
            ("Password: hunter2", "Password: ***"),
            ("password = \"x\"", "password = ***"),
            ("the username or password is wrong", "the username or password is wrong"),
            ("password authentication failed for user \"omni\"", "password authentication failed for user \"omni\""),
            ("password=", "password="),
            ("unterminated password='abc", "unterminated password=***"),
        ] {
            assert_eq!(password_values(text), want, "{text}");
        }
    }

    #[test]
    fn hides_the_password_whatever_it_holds() {
        assert_eq!(url_password("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(url_password("postgres://omni:s3cr@t@db:5432/omni"), "postgres://omni:***@db:5432/omni");
        assert_eq!(url_password("postgres://omni:a/b@db/omni"), "postgres://omni:***@db/omni");
        assert_eq!(url_password("postgres://omni:pw@db/omni?application_name=a@b"), "postgres://omni:***@db/omni?application_name=a@b");
    }

    #[test]
    fn leaves_urls_without_a_password_alone() {
        for url in ["redis://h:6379", "postgres://user@h/db", "not a url", "postgres://h/db?x=a@b"] {
            assert_eq!(url_password(url), url);
        }
    }
}
