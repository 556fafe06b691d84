//! The one error shape every HTTP client of Omni sees: `{"detail", "code"}`,
//! from the worker's handlers and from the gateway's own 502/503/504 alike.

use serde::{Deserialize, Serialize};

/// The JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// What happened and, where it helps, what to do about it.
    pub detail: String,
    /// A stable, machine-readable slug such as `invalid_key`.
    pub code: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, detail: impl Into<String>) -> ErrorBody {
        ErrorBody { detail: detail.into(), code: code.into() }
    }

    /// The serialized body.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("two strings always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_detail_and_code_only() {
        let body = ErrorBody::new("no_worker", "the API worker is restarting; retry");
        let v: serde_json::Value = serde_json::from_str(&body.to_json()).unwrap();
        assert_eq!(v, serde_json::json!({"detail": "the API worker is restarting; retry", "code": "no_worker"}));
    }
}
