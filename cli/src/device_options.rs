//! Parsing device options of the form `key=value,flag,...` (`--disk`).

use std::path::PathBuf;
use vmm::config::{BalloonConfig, DiskConfig, NetConfig};

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

/// `[target_mib=N][,deflate_on_oom][,free_page_reporting]`, or nothing.
pub fn parse_balloon(text: &str) -> Result<BalloonConfig, String> {
    let mut config = BalloonConfig::default();
    if text.is_empty() {
        return Ok(config);
    }
    for (key, value) in items(text)? {
        match (key, value) {
            ("target_mib", Some(value)) => {
                config.target_mib = value
                    .parse()
                    .map_err(|_| format!("target_mib '{value}' is not a number of MiB"))?
            }
            ("deflate_on_oom", None) => config.deflate_on_oom = true,
            ("free_page_reporting", None) => config.free_page_reporting = true,
            _ => {
                return Err(format!(
                    "unknown or malformed '{key}' (expected [target_mib=N][,deflate_on_oom][,free_page_reporting])"
                ))
            }
        }
    }
    Ok(config)
}

/// `tap=NAME[,mac=MAC]`
pub fn parse_net(text: &str) -> Result<NetConfig, String> {
    let mut tap = None;
    let mut mac = None;
    for (key, value) in items(text)? {
        match (key, value) {
            ("tap", Some(value)) if !value.is_empty() => tap = Some(value.to_string()),
            ("mac", Some(value)) => mac = Some(parse_mac(value)?),
            _ => {
                return Err(format!(
                    "unknown or malformed '{key}' (expected tap=NAME[,mac=MAC])"
                ))
            }
        }
    }
    Ok(NetConfig {
        tap: tap.ok_or("missing tap=NAME")?,
        mac,
    })
}

fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("'{text}' is not a MAC address like 02:00:00:00:00:01");
    let bytes: Vec<u8> = text
        .split(':')
        .map(|part| {
            (part.len() == 2)
                .then(|| u8::from_str_radix(part, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    let mac: [u8; 6] = bytes.try_into().map_err(|_| bad())?;
    if mac[0] & 1 != 0 {
        return Err(format!("'{text}' is a multicast address"));
    }
    Ok(mac)
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

    #[test]
    fn parses_nics_and_mac_addresses() {
        assert_eq!(
            parse_net("tap=tap0,mac=02:aa:bb:cc:dd:0e").unwrap(),
            NetConfig {
                tap: "tap0".into(),
                mac: Some([2, 0xaa, 0xbb, 0xcc, 0xdd, 0x0e])
            }
        );
        assert_eq!(parse_net("tap=t").unwrap().mac, None);
        assert_eq!(
            parse_net("mac=02:00:00:00:00:01").unwrap_err(),
            "missing tap=NAME"
        );
        assert!(parse_net("tap=t,mac=02:00:00:00:00")
            .unwrap_err()
            .contains("not a MAC"));
        assert!(parse_net("tap=t,mac=02:00:00:00:00:0g")
            .unwrap_err()
            .contains("not a MAC"));
        assert!(parse_net("tap=t,mac=01:00:00:00:00:01")
            .unwrap_err()
            .contains("multicast"));
    }

    #[test]
    fn parses_balloon_options() {
        assert_eq!(parse_balloon("").unwrap(), BalloonConfig::default());
        let config = parse_balloon("target_mib=64,free_page_reporting").unwrap();
        assert_eq!(
            (
                config.target_mib,
                config.free_page_reporting,
                config.deflate_on_oom
            ),
            (64, true, false)
        );
        assert!(parse_balloon("target_mib=lots")
            .unwrap_err()
            .contains("not a number"));
        assert!(parse_balloon("size=3").unwrap_err().contains("'size'"));
    }
}
