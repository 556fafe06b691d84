//! Who may do what: the route layers that decide it, in one place.
//!
//! - [`require_admin`] guards the `admin` sub-router (routes.rs): backups,
//!   point-in-time recovery, import, accounts and the gateway's credentials
//!   check (gateway logs, metrics history). It runs after
//!   [`auth::require_auth`], which put the [`Principal`] in the request.
//! - [`setup_gate`] guards the setup routes that create credentials or
//!   change where data goes. While the install is not set up, they need the
//!   one-time setup token (header `X-Omni-Setup-Token`), a request from
//!   loopback, or an admin principal; once it is set up (or when
//!   `OMNI_API_KEY` is configured, which counts as set up) they are plain
//!   admin routes.
//! - [`host_check`] guards setup and sign-in against DNS rebinding: the
//!   `Host` (and `X-Forwarded-Host`, `Origin`) a browser sent must be an IP
//!   address, `localhost`, or the host of `OMNI_PUBLIC_URL`. A rebinding page
//!   reaches a loopback-bound gateway under the attacker's own name, which
//!   is none of these.
//!
//! The README's "Who may do what" table and tests/tests/api_roles.rs state
//! the same rules route by route.

use std::net::IpAddr;

use axum::{
    extract::{Request, State},
    http::{HeaderMap, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    auth::{self, Principal},
    errors::ApiError,
    rate_limit,
    routes::AppState,
    setup,
};

/// The header that carries the one-time setup token.
pub const SETUP_TOKEN_HEADER: &str = "x-omni-setup-token";

pub fn admin_required(principal: &Principal) -> ApiError {
    let who = match principal {
        Principal::Account { username, role, .. } => format!("the account {username} has the role {}", role.as_str()),
        Principal::ApiKey => "the API key".to_owned(),
    };
    ApiError::new(
        StatusCode::FORBIDDEN,
        "admin_required",
        format!("only an admin (an account with the admin role, or the API key) may do this; {who}"),
    )
}

/// Route layer of admin-only routes; runs after [`auth::require_auth`].
pub async fn require_admin(request: Request, next: Next) -> Response {
    match request.extensions().get::<Principal>() {
        Some(principal) if principal.is_admin() => next.run(request).await,
        Some(principal) => admin_required(principal).into_response(),
        None => auth::not_signed_in(),
    }
}

/// Whether the request comes from this machine, by the client address the
/// gateway passes on ([`rate_limit::client_address`]).
pub fn from_loopback(request: &Request) -> bool {
    let address = rate_limit::client_address(request.headers(), auth::peer(request));
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback(),
        Ok(IpAddr::V6(ip)) => ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        Err(_) => false,
    }
}

/// Whether `given` is this worker's setup token (constant time).
pub fn token_matches(state: &AppState, given: &[u8]) -> bool {
    let want: [u8; 32] = Sha256::digest(state.setup_token.as_bytes()).into();
    let got: [u8; 32] = Sha256::digest(given).into();
    want.ct_eq(&got).into()
}

/// Route layer of the setup routes that create credentials or change where
/// data goes (see the module text).
pub async fn setup_gate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let open = match setup::is_open(&state).await {
        Ok(open) => open,
        Err(error) => return error.into_response(),
    };
    if open {
        if let Some(given) = request.headers().get(SETUP_TOKEN_HEADER) {
            if token_matches(&state, given.as_bytes()) {
                return next.run(request).await;
            }
            tracing::warn!("a setup request sent a wrong setup token");
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "invalid_setup_token",
                "the X-Omni-Setup-Token header does not match this install's setup token; copy it from the line `setup token: …` of the gateway's log, or from `omni-gateway doctor`",
            )
            .into_response();
        }
        if from_loopback(&request) {
            return next.run(request).await;
        }
    }
    let principal = match auth::authenticate(&state, request.headers(), request.method(), auth::peer(&request)).await {
        Err(response) => return response,
        Ok(Some(principal)) => principal,
        Ok(None) if open => {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "setup_token_required",
                "this install is not set up yet, and only its operator may set it up: open the link `…/setup#token=…` from the gateway's log (or send the token from the line `setup token: …` in the X-Omni-Setup-Token header; `omni-gateway doctor` shows it too), or connect from the machine itself",
            )
            .into_response()
        }
        Ok(None) => return auth::not_signed_in(),
    };
    if !principal.is_admin() {
        return admin_required(&principal).into_response();
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// The host part of a `Host`-style value (`name`, `name:port`, `[v6]:port`), lower case.
fn host_of(authority: &str) -> String {
    let authority = authority.trim();
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(authority, |(h, _)| h)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The host of a URL (`scheme://authority/...`).
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    Some(host_of(authority)).filter(|h| !h.is_empty())
}

/// Whether a browser naming `host` may reach setup and sign-in.
pub fn host_allowed(host: &str, public_url: Option<&str>) -> bool {
    host.parse::<IpAddr>().is_ok() || host == "localhost" || public_url.and_then(url_host).is_some_and(|p| p == host)
}

/// The first host the request names that is not allowed, if any.
fn refused_host(headers: &HeaderMap, public_url: Option<&str>) -> Option<String> {
    let named = ["host", "x-forwarded-host"]
        .into_iter()
        .flat_map(|name| headers.get_all(name).iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(host_of)
        .chain(headers.get_all("origin").iter().filter_map(|v| v.to_str().ok()).filter(|o| *o != "null").map(|o| url_host(o).unwrap_or_else(|| o.to_owned())));
    named.into_iter().find(|host| !host_allowed(host, public_url))
}

/// Route layer of setup and sign-in: 403 when the request names a host
/// that is not this gateway's (DNS rebinding).
pub async fn host_check(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(host) = refused_host(request.headers(), state.settings.public_url.as_deref()) {
        tracing::warn!(%host, "refused a setup or sign-in request for a foreign host name");
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "host_not_allowed",
            format!(
                "this request was addressed to the host {host:?}, which is not this gateway's address; setup and sign-in answer only when the browser uses an IP address, localhost, or the host of OMNI_PUBLIC_URL (set OMNI_PUBLIC_URL to the address users type, e.g. https://omni.example.com)"
            ),
        )
        .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_read_from_every_form() {
        assert_eq!(host_of("127.0.0.1:8882"), "127.0.0.1");
        assert_eq!(host_of("[::1]:8882"), "::1");
        assert_eq!(host_of("LocalHost."), "localhost");
        assert_eq!(host_of("evil.example:80"), "evil.example");
        assert_eq!(url_host("https://user@Omni.Example.com:443/x").as_deref(), Some("omni.example.com"));
    }

    #[test]
    fn only_addresses_localhost_and_the_public_url_are_allowed() {
        let public = Some("https://omni.example.com");
        for host in ["127.0.0.1", "10.1.2.3", "::1", "localhost", "omni.example.com"] {
            assert!(host_allowed(host, public), "{host}");
        }
        for host in ["evil.example", "omni.example.com.evil.example", "localhost.evil.example", ""] {
            assert!(!host_allowed(host, public), "{host}");
        }
        assert!(!host_allowed("omni.example.com", None));
        let mut headers = HeaderMap::new();
        headers.insert("host", "127.0.0.1:8882".parse().unwrap());
        assert_eq!(refused_host(&headers, None), None);
        headers.insert("origin", "http://rebind.evil.example:8882".parse().unwrap());
        assert_eq!(refused_host(&headers, None).as_deref(), Some("rebind.evil.example"));
        headers.insert("origin", "null".parse().unwrap());
        headers.insert("x-forwarded-host", "attacker.example".parse().unwrap());
        assert_eq!(refused_host(&headers, None).as_deref(), Some("attacker.example"));
    }
}
