//! Parsing device options of the form `key=value,flag,...` (`--disk`).

use std::path::PathBuf;
use vmm::config::DiskConfig;

/// Splits `text` into (key, optional value) pairs, refusing empty items.
fn items(text: &str) -> Result<Vec<(&str, Option<&str>)>, String> {
    text.split(',')
        .map(|item| match item.split_once('=') {
            _ if item.is_empty() => Err(format!("empty item in '{text}'")),
            Some((key, value)) => Ok((key, Some(value))),
            None => Ok((item, None)),
        })
        .collect()
}

/// `path=FILE[,readonly][,id=NAME]`
pub fn parse_disk(text: &str) -> Result<DiskConfig, String> {
    let mut path = None;
    let mut read_only = false;
    let mut id = None;
    for (key, value) in items(text)? {
        match (key, value) {
            ("path", Some(value)) if !value.is_empty() => path = Some(PathBuf::from(value)),
            ("readonly" | "ro", None) => read_only = true,
            ("id", Some(value)) => {
                if value.len() > 20 {
                    return Err(format!("id '{value}' is longer than 20 bytes"));
                }
                id = Some(value.to_string());
            }
            _ => {
                return Err(format!(
                    "unknown or malformed '{key}' (expected path=FILE[,readonly][,id=NAME])"
                ))
            }
        }
    }
    let path = path.ok_or("missing path=FILE")?;
    Ok(DiskConfig {
        path,
        read_only,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_disks_and_names_what_is_wrong() {
        assert_eq!(
            parse_disk("path=/tmp/a.ext4,readonly,id=root").unwrap(),
            DiskConfig {
                path: "/tmp/a.ext4".into(),
                read_only: true,
                id: Some("root".into())
            }
        );
        assert!(!parse_disk("path=x").unwrap().read_only);
        assert_eq!(parse_disk("readonly").unwrap_err(), "missing path=FILE");
        assert!(parse_disk("path=x,,ro").unwrap_err().contains("empty item"));
        assert!(parse_disk("path=x,speed=3")
            .unwrap_err()
            .contains("'speed'"));
        assert!(parse_disk("path=x,id=123456789012345678901")
            .unwrap_err()
            .contains("20 bytes"));
    }
}
