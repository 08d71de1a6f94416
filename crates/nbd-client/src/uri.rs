//! NBD URIs (the subset of the NBD URI specification tandem prints and qemu/libnbd accept):
//! `nbd+unix:///EXPORT?socket=PATH` and `nbd://HOST[:PORT][/EXPORT]`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::NbdError;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Where a server listens and which export to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdUri {
    Unix {
        socket: PathBuf,
        export: String,
    },
    Tcp {
        host: String,
        port: u16,
        export: String,
    },
}

impl NbdUri {
    /// The export name the URI asks for (may be empty: the server's default export).
    pub fn export(&self) -> &str {
        match self {
            NbdUri::Unix { export, .. } | NbdUri::Tcp { export, .. } => export,
        }
    }

    /// Parses `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT][/EXPORT]` (percent-encoding
    /// decoded in the export name and socket path; IPv6 hosts in brackets).
    pub fn parse(uri: &str) -> Result<NbdUri, NbdError> {
        let bad = |reason: &str| NbdError::Uri {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            if !path.is_empty() && !path.starts_with('/') {
                return Err(bad(
                    "nbd+unix URIs have no host: expected nbd+unix:///EXPORT?socket=PATH",
                ));
            }
            let export = decode(path.strip_prefix('/').unwrap_or(path))
                .ok_or_else(|| bad("bad percent-encoding in the export name"))?;
            let mut socket = None;
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if k == "socket" {
                    socket = Some(
                        decode(v).ok_or_else(|| bad("bad percent-encoding in the socket path"))?,
                    );
                }
            }
            let socket = socket
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad("missing ?socket=PATH"))?;
            Ok(NbdUri::Unix {
                socket: PathBuf::from(socket),
                export,
            })
        } else if let Some(rest) = uri.strip_prefix("nbd://") {
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, ""),
            };
            if path.contains('?') {
                return Err(bad("query parameters (TLS options) are not supported"));
            }
            let (host, port) = if let Some(r) = authority.strip_prefix('[') {
                let (h, after) = r
                    .split_once(']')
                    .ok_or_else(|| bad("unclosed '[' in the host"))?;
                (h.to_string(), after.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p)),
                    None => (authority.to_string(), None),
                }
            };
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            let port = match port {
                None | Some("") => DEFAULT_PORT,
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            };
            let export =
                decode(path).ok_or_else(|| bad("bad percent-encoding in the export name"))?;
            Ok(NbdUri::Tcp { host, port, export })
        } else {
            Err(bad(
                "expected nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT",
            ))
        }
    }
}

impl FromStr for NbdUri {
    type Err = NbdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NbdUri::parse(s)
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdUri::Unix { socket, export } => write!(
                f,
                "nbd+unix:///{}?socket={}",
                encode(export),
                encode(&socket.to_string_lossy())
            ),
            NbdUri::Tcp { host, port, export } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", encode(export))
            }
            NbdUri::Tcp { host, port, export } => {
                write!(f, "nbd://{host}:{port}/{}", encode(export))
            }
        }
    }
}

fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_uri() {
        let u = NbdUri::parse("nbd+unix:///vol1?socket=/run/tandem/nbd.sock").unwrap();
        assert_eq!(
            u,
            NbdUri::Unix {
                socket: "/run/tandem/nbd.sock".into(),
                export: "vol1".into()
            }
        );
        assert_eq!(
            u.to_string(),
            "nbd+unix:///vol1?socket=/run/tandem/nbd.sock"
        );
        let u = NbdUri::parse("nbd+unix:///a%20b?socket=/tmp/x%20y.sock").unwrap();
        assert_eq!(u.export(), "a b");
        assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        assert!(NbdUri::parse("nbd+unix:///vol").is_err());
        assert!(NbdUri::parse("nbd+unix://host/vol?socket=/x").is_err());
    }

    #[test]
    fn tcp_uri() {
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:10810/disk").unwrap(),
            NbdUri::Tcp {
                host: "127.0.0.1".into(),
                port: 10810,
                export: "disk".into()
            }
        );
        assert_eq!(
            NbdUri::parse("nbd://localhost").unwrap(),
            NbdUri::Tcp {
                host: "localhost".into(),
                port: DEFAULT_PORT,
                export: String::new()
            }
        );
        let v6 = NbdUri::parse("nbd://[::1]:1234/x").unwrap();
        assert_eq!(
            v6,
            NbdUri::Tcp {
                host: "::1".into(),
                port: 1234,
                export: "x".into()
            }
        );
        assert_eq!(v6.to_string(), "nbd://[::1]:1234/x");
        assert!(NbdUri::parse("nbd://h:notaport/x").is_err());
        assert!(NbdUri::parse("http://h/x").is_err());
        assert!(NbdUri::parse("nbd://:1/x").is_err());
    }
}
