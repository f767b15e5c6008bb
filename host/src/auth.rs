//! Who is calling: API tokens (kept only as hashes), their roles, and the
//! project each token belongs to.
//!
//! A token reads `bh_<id>_<secret>`: the id finds its record, the secret is
//! compared by its SHA-256 (the secret is 128 random bits, so a plain hash
//! is as good as a slow one and keeps every request fast).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads VMs, metrics and events.
    Viewer,
    /// Also creates, starts, stops, deletes VMs and attaches consoles.
    Operator,
    /// Also manages tokens and reads the audit log.
    Admin,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub project: String,
    pub role: Role,
    /// Hex SHA-256 of the secret.
    #[schema(ignore)]
    #[serde(default)]
    pub secret_sha256: String,
    pub created_at: u64,
}

/// The caller of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// For the audit log: `token:<id>(<name>)` or `local:uid=<n>`.
    pub name: String,
    /// The only project it may see; None for the host's own administrator
    /// (root on the daemon's Unix socket), who sees all.
    pub project: Option<String>,
    pub role: Role,
}

impl Principal {
    pub fn local(uid: u32) -> Principal {
        Principal {
            name: format!("local:uid={uid}"),
            project: None,
            role: Role::Admin,
        }
    }

    pub fn may_see(&self, project: &str) -> bool {
        self.project.as_deref().is_none_or(|own| own == project)
    }
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new token: its record (to store) and the text to hand out once.
pub fn new_token(name: &str, project: &str, role: Role) -> (TokenRecord, String) {
    let id = crate::model::random_hex(6);
    let secret = crate::model::random_hex(16);
    let record = TokenRecord {
        id: id.clone(),
        name: name.to_string(),
        project: project.to_string(),
        role,
        secret_sha256: sha256_hex(&secret),
        created_at: crate::model::unix_now(),
    };
    (record, format!("bh_{id}_{secret}"))
}

/// Splits a presented token into its id and secret.
pub fn parse_token(text: &str) -> Option<(&str, &str)> {
    let rest = text.strip_prefix("bh_")?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 12) && hex(secret, 32)).then_some((id, secret))
}

/// Whether `secret` is the one `record` was made with (constant time).
pub fn secret_matches(record: &TokenRecord, secret: &str) -> bool {
    let presented = sha256_hex(secret);
    presented.len() == record.secret_sha256.len()
        && presented
            .bytes()
            .zip(record.secret_sha256.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_only_with_its_own_secret() {
        let (record, text) = new_token("ci", "alpha", Role::Operator);
        assert!(!record.secret_sha256.contains(&text[16..]));
        let (id, secret) = parse_token(&text).unwrap();
        assert_eq!(id, record.id);
        assert!(secret_matches(&record, secret));
        let (_, other) = new_token("ci", "alpha", Role::Operator);
        let (_, other_secret) = parse_token(&other).unwrap();
        assert!(!secret_matches(&record, other_secret));
        for bad in [
            "",
            "bh_",
            "bh_zz_zz",
            "xx_0123456789ab_0123",
            &text[..text.len() - 1],
        ] {
            assert!(parse_token(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn roles_are_ordered_and_projects_confine() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        let local = Principal::local(0);
        assert!(local.may_see("any"));
        let tenant = Principal {
            name: "t".into(),
            project: Some("a".into()),
            role: Role::Admin,
        };
        assert!(tenant.may_see("a") && !tenant.may_see("b"));
    }
}
