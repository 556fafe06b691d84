//! "Test connection": one probe object written, read back, found in a
//! listing and deleted, each step timed, the first failure named with the
//! likely reason (wrong credentials, no such bucket, clock skew, TLS, the
//! store unreachable). Behind `POST /api/v1/backup/repository/test` (the
//! worker asks `/gateway/internal/repository/test`), so an operator can
//! check a new key or bucket before the first backup depends on it.
//!
//! The probe lives under `probe/` beside the generations and is never read
//! by a restore. With `OMNI_REPOSITORY_DELETE=false` (credentials that
//! cannot delete) the last step is skipped, and the answer says the probe
//! object stays.

use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;

use super::store::{Repository, RepositoryError};

/// One step of the probe.
#[derive(Debug, Serialize)]
pub struct Step {
    /// `write`, `read`, `list` or `delete`.
    pub step: &'static str,
    pub ok: bool,
    pub ms: u64,
    /// What went wrong, already redacted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The whole answer.
#[derive(Debug, Serialize)]
pub struct Report {
    pub ok: bool,
    /// The repository, as safe to show (no credentials in it).
    pub repository: String,
    /// The probe object's name under the repository's prefix.
    pub object: String,
    /// The step that failed, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<&'static str>,
    /// Why it most likely failed: `wrong_credentials`, `permission_denied`,
    /// `no_bucket`, `clock_skew`, `tls`, `unreachable`, `conflict` or `other`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// One sentence for the operator: what failed and what to check.
    pub summary: String,
    pub steps: Vec<Step>,
}

/// Runs the four steps against `repo`; `delete` false skips the last one.
pub async fn run(repo: &Repository, delete: bool) -> Report {
    let object = format!("probe/{}-{}.txt", chrono::Utc::now().format("%Y%m%dT%H%M%SZ"), rand_suffix());
    let body = Bytes::from(format!("omni-gateway repository probe, {}\n", chrono::Utc::now().to_rfc3339()));
    let mut steps = Vec::new();

    let failed = |steps: Vec<Step>, step: &'static str, e: String| {
        let reason = classify(&e);
        Report {
            ok: false,
            repository: repo.display(),
            object: object.clone(),
            failed_step: Some(step),
            reason: Some(reason),
            summary: format!("The {step} failed. {}", advice(reason)),
            steps,
        }
    };

    let started = Instant::now();
    // Encrypted like every object when encryption is on (put_object).
    let wrote = repo.put_object(&object, body.clone()).await;
    steps.push(step("write", started, wrote.as_ref().err().map(RepositoryError::to_string)));
    let stored = match wrote {
        Ok(stored) => stored,
        Err(e) => return failed(steps, "write", e.to_string()),
    };

    let started = Instant::now();
    let read = match repo.get(&object).await {
        Ok(bytes) if super::store::sha256_hex(&bytes) == stored.sha256 => Ok(()),
        Ok(bytes) => Err(format!("read back {} bytes that differ from the {} written", bytes.len(), stored.size)),
        Err(e) => Err(e.to_string()),
    };
    steps.push(step("read", started, read.clone().err()));
    if let Err(e) = read {
        return failed(steps, "read", e);
    }

    let started = Instant::now();
    let listed = match repo.list("probe/").await {
        Ok(found) if found.iter().any(|o| o.path == object) => Ok(()),
        Ok(found) => Err(format!("the listing of probe/ ({} objects) does not show {object}", found.len())),
        Err(e) => Err(e.to_string()),
    };
    steps.push(step("list", started, listed.clone().err()));
    if let Err(e) = listed {
        return failed(steps, "list", e);
    }

    if !delete {
        return Report {
            ok: true,
            repository: repo.display(),
            summary: format!("Written, read back and listed; not deleted (OMNI_REPOSITORY_DELETE=false): {object} stays."),
            object,
            failed_step: None,
            reason: None,
            steps,
        };
    }
    let started = Instant::now();
    let deleted = match repo.delete(&object).await {
        Ok(()) => match repo.head(&object).await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(format!("{object} is still there after its delete")),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    steps.push(step("delete", started, deleted.clone().err()));
    if let Err(e) = deleted {
        return failed(steps, "delete", e);
    }
    Report { ok: true, repository: repo.display(), object, failed_step: None, reason: None, summary: "Written, read back, listed and deleted.".into(), steps }
}

fn step(name: &'static str, started: Instant, detail: Option<String>) -> Step {
    Step { step: name, ok: detail.is_none(), ms: started.elapsed().as_millis() as u64, detail }
}

fn rand_suffix() -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    format!("{n:016x}")
}

/// The likely reason behind a store's error text. The clouds word the same
/// failure differently (S3's `InvalidAccessKeyId`, Azure's
/// `AuthenticationFailed`, GCS's `invalid_grant`); the first match wins, so
/// the specific ones (clock skew, a missing bucket) come before the general.
pub fn classify(text: &str) -> &'static str {
    let t = text.to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| t.contains(w));
    if any(&["requesttimetooskewed", "clock skew", "time too skewed", "skewed"]) {
        "clock_skew"
    } else if any(&["nosuchbucket", "bucket does not exist", "containernotfound", "the specified container does not exist", "bucket not found", "no such bucket", "nosuchcontainer"]) {
        "no_bucket"
    } else if any(&["invalidaccesskeyid", "signaturedoesnotmatch", "authenticationfailed", "invalid_grant", "unauthenticated", "unauthorized", "status 401", "invalid credentials", "not authorized", "access key"]) {
        "wrong_credentials"
    } else if any(&["accessdenied", "access denied", "forbidden", "permission", "authorizationpermissionmismatch"]) {
        "permission_denied"
    } else if any(&["certificate", "tls", "ssl", "handshake", "unknownissuer"]) {
        "tls"
    } else if any(&["connection refused", "connect", "dns error", "timed out", "timeout", "unreachable", "no route to host", "error sending request"]) {
        "unreachable"
    } else if any(&["already exists with other content"]) {
        "conflict"
    } else {
        "other"
    }
}

fn advice(reason: &str) -> &'static str {
    match reason {
        "clock_skew" => "The store refused the request's time: this machine's clock is off (check NTP).",
        "no_bucket" => "The bucket or container does not exist: create it, or correct OMNI_REPOSITORY_URL.",
        "wrong_credentials" => "The store did not accept the credentials: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or GOOGLE_*/AZURE_*).",
        "permission_denied" => "The credentials are valid but may not do this: grant write, read and list (and delete, unless OMNI_REPOSITORY_DELETE=false).",
        "tls" => "The TLS connection to the store failed: check the endpoint's certificate and the system's CA certificates.",
        "unreachable" => "The store could not be reached: check AWS_ENDPOINT_URL (or the GCS/Azure endpoint), the network and AWS_ALLOW_HTTP for a plain-HTTP endpoint.",
        "conflict" => "An object of the probe's name holds other bytes.",
        _ => "See the step's detail.",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_clouds_wording_maps_to_one_reason() {
        for (text, reason) in [
            ("Error performing PUT: Client error with status 403 Forbidden: <Code>RequestTimeTooSkewed</Code>", "clock_skew"),
            ("Client error with status 404 Not Found: <Code>NoSuchBucket</Code>", "no_bucket"),
            ("Client error with status 404: ContainerNotFound", "no_bucket"),
            ("Client error with status 403 Forbidden: <Code>InvalidAccessKeyId</Code>", "wrong_credentials"),
            ("<Code>SignatureDoesNotMatch</Code>", "wrong_credentials"),
            ("Server returned 403: AuthenticationFailed", "wrong_credentials"),
            ("status 403 Forbidden: <Code>AccessDenied</Code>", "permission_denied"),
            ("error sending request: invalid peer certificate: UnknownIssuer", "tls"),
            ("error sending request for url (http://127.0.0.1:9/b/x): client error (Connect)", "unreachable"),
            ("something else entirely", "other"),
        ] {
            assert_eq!(classify(text), reason, "{text}");
        }
    }

    #[tokio::test]
    async fn a_directory_repository_passes_every_step_and_keeps_nothing() {
        let dir = std::env::temp_dir().join(format!("omni-probe-{}", rand_suffix()));
        let repo = Repository::open(&format!("file://{}", dir.display())).unwrap();
        let report = run(&repo, true).await;
        assert!(report.ok, "{report:?}");
        assert_eq!(report.steps.iter().map(|s| s.step).collect::<Vec<_>>(), ["write", "read", "list", "delete"]);
        assert!(repo.list("probe/").await.unwrap().is_empty(), "the probe object is gone");
        let kept = run(&repo, false).await;
        assert!(kept.ok && kept.steps.len() == 3, "{kept:?}");
        assert_eq!(repo.list("probe/").await.unwrap().len(), 1, "without delete the probe stays");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
