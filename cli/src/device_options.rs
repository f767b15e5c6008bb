//! Parsing device options of the form `key=value,flag,...` (`--disk`).

use std::path::PathBuf;
use vmm::config::{BalloonConfig, DiskSpec, NicSpec, RateLimit, VsockSpec};

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

/// A count with an optional binary suffix: 4096, 64K, 10M, 1G.
fn parse_amount(key: &str, value: &str) -> Result<u64, String> {
    let (digits, shift) = match value.char_indices().last() {
        Some((at, 'K' | 'k')) => (&value[..at], 10),
        Some((at, 'M' | 'm')) => (&value[..at], 20),
        Some((at, 'G' | 'g')) => (&value[..at], 30),
        _ => (value, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_shl(shift).filter(|v| v >> shift == n))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{key}={value} is not a positive number (suffixes K, M, G)"))
}

/// Takes a rate-limit item (bps, iops, bps_burst, iops_burst); false if `key` is not one.
fn rate_limit_item(limit: &mut RateLimit, key: &str, value: Option<&str>) -> Result<bool, String> {
    let slot = match key {
        "bps" => &mut limit.bytes_per_sec,
        "bps_burst" => &mut limit.bytes_burst,
        "iops" => &mut limit.ops_per_sec,
        "iops_burst" => &mut limit.ops_burst,
        _ => return Ok(false),
    };
    let value = value.ok_or_else(|| format!("{key} needs a value"))?;
    *slot = Some(parse_amount(key, value)?);
    Ok(true)
}

/// `path=FILE[,readonly][,id=NAME][,bps=N][,iops=N][,bps_burst=N][,iops_burst=N]`
pub fn parse_disk(text: &str) -> Result<DiskSpec, String> {
    let mut path = None;
    let mut read_only = false;
    let mut id = None;
    let mut rate_limit = RateLimit::default();
    for (key, value) in items(text)? {
        if rate_limit_item(&mut rate_limit, key, value)? {
            continue;
        }
        match (key, value) {
            ("path", Some(value)) if !value.is_empty() => path = Some(PathBuf::from(value)),
            ("readonly" | "ro", None) => read_only = true,
            ("id", Some(value)) => {
                vmm::config::check_disk_id(value)?;
                id = Some(value.to_string());
            }
            _ => {
                return Err(format!(
                    "unknown or malformed '{key}' (expected path=FILE[,readonly][,id=NAME][,bps=N][,iops=N])"
                ))
            }
        }
    }
    let path = path.ok_or("missing path=FILE")?;
    rate_limit.check()?;
    Ok(DiskSpec {
        path,
        readonly: read_only,
        id,
        rate_limit,
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

/// `cid=N[,socket=PATH]`
pub fn parse_vsock(text: &str) -> Result<VsockSpec, String> {
    let mut cid = None;
    let mut socket = None;
    for (key, value) in items(text)? {
        match (key, value) {
            ("cid", Some(value)) => {
                cid = Some(
                    value
                        .parse::<u32>()
                        .ok()
                        .filter(|&cid| (3..u32::MAX).contains(&cid))
                        .ok_or_else(|| {
                            format!("cid={value} must be a number from 3 to {}", u32::MAX - 1)
                        })?,
                )
            }
            ("socket", Some(value)) if !value.is_empty() => socket = Some(PathBuf::from(value)),
            _ => {
                return Err(format!(
                    "unknown or malformed '{key}' (expected cid=N[,socket=PATH])"
                ))
            }
        }
    }
    Ok(VsockSpec {
        cid: cid.ok_or("missing cid=N")?,
        socket,
    })
}

/// `tap=NAME[,mac=MAC][,bps=N][,iops=N][,bps_burst=N][,iops_burst=N]`
pub fn parse_net(text: &str) -> Result<NicSpec, String> {
    let mut tap = None;
    let mut mac = None;
    let mut rate_limit = RateLimit::default();
    for (key, value) in items(text)? {
        if rate_limit_item(&mut rate_limit, key, value)? {
            continue;
        }
        match (key, value) {
            ("tap", Some(value)) if !value.is_empty() => tap = Some(value.to_string()),
            ("mac", Some(value)) => {
                vmm::config::parse_mac(value)?;
                mac = Some(value.to_string());
            }
            _ => {
                return Err(format!(
                    "unknown or malformed '{key}' (expected tap=NAME[,mac=MAC][,bps=N][,iops=N])"
                ))
            }
        }
    }
    rate_limit.check()?;
    Ok(NicSpec {
        tap: tap.ok_or("missing tap=NAME")?,
        mac,
        rate_limit,
    })
}

/// `uid=N,gid=N` for `--sandbox`.
pub fn parse_sandbox(text: &str) -> Result<vmm::sandbox::SandboxConfig, String> {
    let mut uid = None;
    let mut gid = None;
    for part in text.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("expected uid=N,gid=N, got {part:?}"))?;
        let number: u32 = value
            .parse()
            .map_err(|_| format!("{key}: {value:?} is not a number"))?;
        match key {
            "uid" => uid = Some(number),
            "gid" => gid = Some(number),
            _ => {
                return Err(format!(
                    "unknown sandbox option {key:?} (expected uid, gid)"
                ))
            }
        }
    }
    match (uid, gid) {
        (Some(0), _) | (_, Some(0)) => Err("the sandbox needs a uid and gid other than 0".into()),
        (Some(uid), Some(gid)) => Ok(vmm::sandbox::SandboxConfig { uid, gid }),
        _ => Err("the sandbox needs both uid=N and gid=N".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_disks_and_names_what_is_wrong() {
        assert_eq!(
            parse_disk("path=/tmp/a.ext4,readonly,id=root").unwrap(),
            DiskSpec {
                path: "/tmp/a.ext4".into(),
                readonly: true,
                id: Some("root".into()),
                rate_limit: RateLimit::default(),
            }
        );
        assert!(!parse_disk("path=x").unwrap().readonly);
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
            NicSpec {
                tap: "tap0".into(),
                mac: Some("02:aa:bb:cc:dd:0e".into()),
                rate_limit: RateLimit::default(),
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

    #[test]
    fn parses_rate_limits_with_suffixes() {
        let disk = parse_disk("path=d,bps=10M,iops=500,bps_burst=64k").unwrap();
        assert_eq!(
            disk.rate_limit,
            RateLimit {
                bytes_per_sec: Some(10 << 20),
                bytes_burst: Some(64 << 10),
                ops_per_sec: Some(500),
                ops_burst: None,
            }
        );
        assert_eq!(
            parse_net("tap=t,bps=1G").unwrap().rate_limit.bytes_per_sec,
            Some(1 << 30)
        );
        assert!(parse_disk("path=d,bps=0").unwrap_err().contains("positive"));
        assert!(parse_disk("path=d,iops=fast")
            .unwrap_err()
            .contains("positive"));
        assert!(parse_disk("path=d,bps=99999999999G")
            .unwrap_err()
            .contains("positive"));
        assert!(parse_disk("path=d,bps")
            .unwrap_err()
            .contains("needs a value"));
    }

    #[test]
    fn parses_vsock_options() {
        let vsock = parse_vsock("cid=3,socket=/tmp/v.sock").unwrap();
        assert_eq!(
            (vsock.cid, vsock.socket),
            (3, Some(PathBuf::from("/tmp/v.sock")))
        );
        assert!(parse_vsock("cid=2,socket=x")
            .unwrap_err()
            .contains("from 3"));
        assert_eq!(parse_vsock("cid=3").unwrap().socket, None);
        assert_eq!(parse_vsock("socket=x").unwrap_err(), "missing cid=N");
    }
}
