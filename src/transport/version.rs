//! VFIO_USER_VERSION: parse the client's capabilities, build our reply.
//!
//! QEMU gives the reply a receive buffer exactly the size of its own request
//! (214 bytes in 11.1.3); a longer reply desyncs its stream. So the reply
//! drops optional capabilities, least useful first, until it fits.

use serde_json::Value;

use super::error::TransportError;
use super::limits::Limits;
use super::wire::{self, Version};

/// What the client told us about itself (spec defaults where absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCaps {
    pub major: u16,
    pub minor: u16,
    /// Fds the client accepts in one message of ours (spec default 1).
    pub max_msg_fds: u64,
    /// Largest DMA_READ/WRITE `count` the client accepts (default 1 MiB).
    pub max_data_xfer_size: u64,
    pub pgsizes: u64,
    pub write_multiple: bool,
}

impl Default for ClientCaps {
    fn default() -> Self {
        ClientCaps {
            major: 0,
            minor: 0,
            max_msg_fds: 1,
            max_data_xfer_size: 1 << 20,
            pgsizes: 4096,
            write_multiple: false,
        }
    }
}

/// Parses a VERSION request body (major, minor, optional NUL-terminated
/// JSON). Anything malformed is EINVAL.
pub fn parse_request(body: &[u8]) -> Result<ClientCaps, TransportError> {
    let v: Version = wire::read_prefix(body)
        .ok_or_else(|| TransportError::invalid("VERSION body shorter than 4 bytes"))?;
    if v.major != 0 {
        return Err(TransportError::invalid(format!(
            "unsupported major version {}",
            v.major
        )));
    }
    let mut caps = ClientCaps {
        major: v.major,
        minor: v.minor,
        ..ClientCaps::default()
    };
    let data = &body[size_of::<Version>()..];
    if data.is_empty() {
        // The version data is optional (spec "VFIO_USER_VERSION").
        return Ok(caps);
    }
    let Some((&0, json)) = data.split_last() else {
        return Err(TransportError::invalid(
            "VERSION data is not NUL-terminated",
        ));
    };
    let json: Value = serde_json::from_slice(json)
        .map_err(|e| TransportError::invalid(format!("VERSION data is not JSON: {e}")))?;
    let obj = json
        .as_object()
        .ok_or_else(|| TransportError::invalid("VERSION data is not a JSON object"))?;
    let Some(c) = obj.get("capabilities") else {
        return Ok(caps);
    };
    let c = c
        .as_object()
        .ok_or_else(|| TransportError::invalid("\"capabilities\" is not an object"))?;
    let num = |key: &str| -> Result<Option<u64>, TransportError> {
        match c.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                TransportError::invalid(format!("capability {key} is not a number"))
            }),
        }
    };
    if let Some(n) = num("max_msg_fds")? {
        caps.max_msg_fds = n;
    }
    if let Some(n) = num("max_data_xfer_size")? {
        caps.max_data_xfer_size = n;
    }
    if let Some(n) = num("pgsizes")? {
        caps.pgsizes = n;
    }
    num("max_dma_maps")?;
    if let Some(w) = c.get("write_multiple") {
        caps.write_multiple = w
            .as_bool()
            .ok_or_else(|| TransportError::invalid("write_multiple is not a boolean"))?;
    }
    for key in ["migration", "twin_socket"] {
        if let Some(v) = c.get(key)
            && !v.is_object()
        {
            return Err(TransportError::invalid(format!(
                "capability {key} is not an object"
            )));
        }
    }
    Ok(caps)
}

/// Our capabilities, most important first: the reply keeps the longest
/// prefix of this list that fits.
fn our_caps(limits: &Limits) -> [(&'static str, String); 5] {
    [
        ("max_msg_fds", limits.max_msg_fds.to_string()),
        (
            "max_data_xfer_size",
            limits.max_data_xfer_size().to_string(),
        ),
        ("pgsizes", wire::PAGE_SIZE.to_string()),
        // Below the spec's default of 65535, so a client that is not told
        // would plan on more maps than we take.
        ("max_dma_maps", limits.max_dma_maps.to_string()),
        ("write_multiple", "true".to_string()),
    ]
}

/// The VERSION reply body (major 0, minor 0, NUL-terminated JSON), no longer
/// than `request_body_len` so that header + body ≤ the request's size.
/// If the request carried no JSON at all, neither does the reply. The
/// numbers advertised are the connection's `limits`.
pub fn build_reply(request_body_len: usize, limits: &Limits) -> Vec<u8> {
    let mut body = Vec::with_capacity(request_body_len);
    body.extend_from_slice(zerocopy::IntoBytes::as_bytes(&Version {
        major: 0,
        minor: 0,
    }));
    if request_body_len <= size_of::<Version>() {
        return body;
    }
    let room = request_body_len - size_of::<Version>();
    let caps = our_caps(limits);
    let json = (0..=caps.len())
        .rev()
        .map(|n| {
            let inner: Vec<String> = caps[..n]
                .iter()
                .map(|(k, v)| format!("\"{k}\":{v}"))
                .collect();
            format!("{{\"capabilities\":{{{}}}}}", inner.join(","))
        })
        .chain(std::iter::once("{}".to_string()))
        .find(|j| j.len() < room)
        // Always send at least `{}\0` (QEMU checks for a NUL-terminated
        // object); a request too short for it was malformed anyway.
        .unwrap_or_else(|| "{}".to_string());
    body.extend_from_slice(json.as_bytes());
    body.push(0);
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> Vec<u8> {
        let mut b = vec![0, 0, 0, 0];
        b.extend_from_slice(json.as_bytes());
        b.push(0);
        b
    }

    /// QEMU's `caps_json`, printed by its QObject JSON writer (", " and ": ").
    const QEMU: &str = r#"{"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1048576, "pgsizes": 4096, "max_dma_maps": 65535, "write_multiple": true, "migration": {"pgsize": 4096, "max_bitmap_size": 268435456}}}"#;

    #[test]
    fn qemu_request_parses_and_reply_fits() {
        let req = request(QEMU);
        // 16 + this = 214 bytes, the size QEMU 11.1.3 sends.
        assert_eq!(16 + req.len(), 214);
        let caps = parse_request(&req).unwrap();
        assert_eq!(caps.max_msg_fds, 16);
        assert!(caps.write_multiple);
        let reply = build_reply(req.len(), &Limits::default());
        assert!(reply.len() <= req.len());
        assert_eq!(*reply.last().unwrap(), 0);
        let v: Value = serde_json::from_slice(&reply[4..reply.len() - 1]).unwrap();
        assert_eq!(v["capabilities"]["max_msg_fds"], 16);
        assert_eq!(v["capabilities"]["max_data_xfer_size"], 1048576);
        assert_eq!(v["capabilities"]["write_multiple"], true);
        assert_eq!(v["capabilities"]["max_dma_maps"], wire::MAX_DMA_MAPS);
    }

    #[test]
    fn short_requests_get_shorter_replies() {
        for len in [7, 8, 20, 40, 60, 100] {
            let r = build_reply(len, &Limits::default());
            assert!(r.len() <= len, "len {len} -> {}", r.len());
            assert_eq!(*r.last().unwrap(), 0);
            assert!(
                serde_json::from_slice::<Value>(&r[4..r.len() - 1])
                    .unwrap()
                    .is_object()
            );
        }
        assert_eq!(build_reply(4, &Limits::default()).len(), 4);
    }

    #[test]
    fn malformed_requests_are_einval() {
        let bad = [
            vec![0u8, 0],
            vec![1, 0, 0, 0, b'{', b'}', 0],
            {
                let mut b = request("{}");
                b.pop();
                b
            },
            request("{not json"),
            request("[1,2]"),
            request(r#"{"capabilities":3}"#),
            request(r#"{"capabilities":{"max_msg_fds":"x"}}"#),
            request(r#"{"capabilities":{"write_multiple":1}}"#),
            request(r#"{"capabilities":{"migration":1}}"#),
        ];
        for b in bad {
            assert_eq!(
                parse_request(&b).unwrap_err().errno(),
                libc::EINVAL as u32,
                "{b:?}"
            );
        }
        assert_eq!(parse_request(&[0, 0, 1, 0]).unwrap().minor, 1);
    }
}
