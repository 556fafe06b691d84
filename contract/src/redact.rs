//! Secrets never reach a log line or a status document: the password in a
//! connection URL is shown as `***`.

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
    use super::url_password;

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
