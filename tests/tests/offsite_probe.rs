//! "Test connection" for the off-site repository,
//! `POST /api/v1/backup/repository/test`, through a real gateway and its
//! worker: a directory repository passes every step and keeps nothing; a
//! real S3 server (rclone, which checks signatures) with a wrong secret, a
//! bucket that does not exist, then the server gone, each fail at the step
//! they fail at, with the reason, and without the secret in the answer.

use crate::gateway;

use gateway::{workdir, Gateway, GatewayBuilder};
use omni_tests::stores::{Kind, StoreServer};
use omni_tests::{Request, TEST_API_KEY};

fn start(dir: &std::path::Path, env: &[(String, String)]) -> Gateway {
    let mut builder = GatewayBuilder::new(dir).env("OMNI_API_KEY", TEST_API_KEY);
    for (k, v) in env {
        builder = builder.env(k, v.clone());
    }
    builder.start()
}

fn probe(gw: &Gateway) -> (u16, serde_json::Value) {
    let answer = Request::new("POST", "/api/v1/backup/repository/test").api_key().send_to(gw.port);
    (answer.status, answer.json())
}

fn steps(report: &serde_json::Value) -> Vec<(String, bool)> {
    report["steps"].as_array().unwrap().iter().map(|s| (s["step"].as_str().unwrap().to_owned(), s["ok"].as_bool().unwrap())).collect()
}

#[test]
fn a_directory_repository_passes_every_step_and_keeps_no_probe() {
    let dir = workdir();
    let offsite = dir.path().join("offsite");
    let gw = start(dir.path(), &[("OMNI_REPOSITORY_URL".into(), format!("file://{}", offsite.display()))]);
    let (status, report) = probe(&gw);
    assert_eq!(status, 200, "{report}\n{}", gw.log());
    assert_eq!(report["ok"], true, "{report}");
    let names: Vec<(String, bool)> = ["write", "read", "list", "delete"].iter().map(|s| (s.to_string(), true)).collect();
    assert_eq!(steps(&report), names, "{report}");
    assert_eq!(report["repository"], format!("file://{}", offsite.display()));
    let probes = offsite.join("probe");
    let left: Vec<_> = std::fs::read_dir(&probes).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "the probe object is deleted: {left:?}");
    // No key: 401, as for every backup endpoint.
    let keyless = Request::new("POST", "/api/v1/backup/repository/test").send_to(gw.port);
    assert_eq!(keyless.status, 401);
}

#[test]
fn without_a_repository_the_test_answers_409_and_says_what_to_set() {
    let dir = workdir();
    let gw = start(dir.path(), &[]);
    let (status, body) = probe(&gw);
    assert_eq!((status, body["code"].as_str()), (409, Some("repository_unconfigured")), "{body}");
    assert!(body["detail"].as_str().unwrap().contains("OMNI_REPOSITORY_URL"), "{body}");
}

#[test]
fn a_wrong_secret_a_missing_bucket_and_a_store_gone_each_fail_with_their_reason() {
    let mut s3 = StoreServer::start_new(Kind::Rclone);
    let good: Vec<(String, String)> = s3.env().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let secret = s3.env()["AWS_SECRET_ACCESS_KEY"].clone();
    let wrong_secret = "wrong-secret-0123456789abcdef";

    // The right bucket, the wrong secret: the first request is refused.
    let dir = workdir();
    let mut env: Vec<(String, String)> = good.iter().filter(|(k, _)| k != "AWS_SECRET_ACCESS_KEY").cloned().collect();
    env.push(("AWS_SECRET_ACCESS_KEY".into(), wrong_secret.into()));
    env.push(("OMNI_REPOSITORY_URL".into(), s3.url("probe-test")));
    let gw = start(dir.path(), &env);
    let (status, report) = probe(&gw);
    assert_eq!(status, 200, "{report}");
    assert_eq!((report["ok"].as_bool(), report["failed_step"].as_str(), report["reason"].as_str()), (Some(false), Some("write"), Some("wrong_credentials")), "{report}");
    assert_eq!(steps(&report), vec![("write".to_owned(), false)], "{report}");
    assert!(report["summary"].as_str().unwrap().contains("AWS_SECRET_ACCESS_KEY"), "the summary says what to check: {report}");
    let text = report.to_string();
    assert!(!text.contains(wrong_secret) && !text.contains(&secret), "no secret in the answer: {text}");
    assert_eq!(gw.get("/health").status, 200, "a failing repository never takes the service down");
    drop(gw);

    // The right secret, a bucket that does not exist.
    let dir = workdir();
    let mut env = good.clone();
    env.push(("OMNI_REPOSITORY_URL".into(), "s3://no-such-bucket/x".into()));
    let gw = start(dir.path(), &env);
    let (status, report) = probe(&gw);
    assert_eq!(status, 200, "{report}");
    assert_eq!((report["ok"].as_bool(), report["failed_step"].as_str(), report["reason"].as_str()), (Some(false), Some("write"), Some("no_bucket")), "{report}");

    // The store gone: unreachable, said at the write.
    s3.stop();
    let (status, report) = probe(&gw);
    assert_eq!(status, 200, "{report}");
    assert_eq!((report["ok"].as_bool(), report["failed_step"].as_str(), report["reason"].as_str()), (Some(false), Some("write"), Some("unreachable")), "{report}");
}
