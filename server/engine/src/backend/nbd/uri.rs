//! NBD URIs: [`NbdUri`], parsed from the `nbd://` and `nbd+unix://` forms
//! of the NBD URI specification and printed back in them.

use crate::error::EngineError;
use blockmirror_nbd::option as opt;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The IANA port of NBD, used when a `nbd://` URI names none.
const DEFAULT_PORT: u16 = 10809;

/// The URI forms [`NbdUri::parse`] accepts, for error messages.
const URI_FORMS: &str = "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH";

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Endpoint {
    /// TCP, by host name or address.
    Tcp { host: String, port: u16 },
    /// A unix socket.
    Unix { socket: PathBuf },
}

/// A parsed NBD URI: `nbd://host[:port]/export` or
/// `nbd+unix:///export?socket=/path/to.sock` (the forms of the NBD URI
/// specification, without TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub(super) endpoint: Endpoint,
    export: String,
}

impl NbdUri {
    /// Parses `uri`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidArgument`], naming the accepted forms, for any
    /// other scheme (including TLS, `nbds://`), a missing host or socket,
    /// a bad port, unknown query parameters or bad percent-escapes.
    ///
    /// [`ErrorKind::InvalidArgument`]: crate::error::ErrorKind::InvalidArgument
    pub fn parse(uri: &str) -> Result<Self, EngineError> {
        let bad = |why: &str| {
            EngineError::invalid(format!("NBD URI {uri:?}: {why}; expected {URI_FORMS}"))
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("no scheme"))?;
        if rest.contains('#') {
            return Err(bad("fragments are not allowed"));
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
        let export =
            percent_decode(path).ok_or_else(|| bad("bad percent-escape in the export name"))?;
        if export.len() > opt::MAX_NAME_BYTES {
            return Err(bad("the export name is longer than 4096 bytes"));
        }
        let endpoint = if scheme.eq_ignore_ascii_case("nbd") {
            if query.is_some() {
                return Err(bad("nbd:// takes no query parameters"));
            }
            let (host, port) =
                split_host_port(authority).ok_or_else(|| bad("bad or missing host or port"))?;
            Endpoint::Tcp { host, port }
        } else if scheme.eq_ignore_ascii_case("nbd+unix") {
            if !authority.is_empty() {
                return Err(bad("nbd+unix:// takes no host"));
            }
            let mut socket = None;
            for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                if key != "socket" {
                    return Err(bad("unknown query parameter"));
                }
                if socket.is_some() {
                    return Err(bad("more than one socket parameter"));
                }
                socket = Some(
                    percent_decode(value)
                        .ok_or_else(|| bad("bad percent-escape in the socket path"))?,
                );
            }
            let socket = socket
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad("missing socket=PATH"))?;
            Endpoint::Unix {
                socket: PathBuf::from(socket),
            }
        } else if scheme.eq_ignore_ascii_case("nbds") || scheme.eq_ignore_ascii_case("nbds+unix") {
            return Err(bad("TLS (nbds) is not supported"));
        } else {
            return Err(bad("unsupported scheme"));
        };
        Ok(Self { endpoint, export })
    }

    /// The export name (may be empty: the server's default export).
    pub fn export(&self) -> &str {
        &self.export
    }

    /// Host and port, for a TCP URI.
    pub fn tcp_address(&self) -> Option<(&str, u16)> {
        match &self.endpoint {
            Endpoint::Tcp { host, port } => Some((host, *port)),
            Endpoint::Unix { .. } => None,
        }
    }

    /// The socket path, for a unix-socket URI.
    pub fn socket_path(&self) -> Option<&Path> {
        match &self.endpoint {
            Endpoint::Tcp { .. } => None,
            Endpoint::Unix { socket } => Some(socket),
        }
    }
}

impl FromStr for NbdUri {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export, PATH_SAFE);
        match &self.endpoint {
            Endpoint::Tcp { host, port } => {
                f.write_str("nbd://")?;
                if host.contains(':') {
                    write!(f, "[{host}]")?;
                } else {
                    f.write_str(host)?;
                }
                if *port != DEFAULT_PORT {
                    write!(f, ":{port}")?;
                }
                write!(f, "/{export}")
            }
            Endpoint::Unix { socket } => {
                let socket = percent_encode(&socket.to_string_lossy(), QUERY_SAFE);
                write!(f, "nbd+unix:///{export}?socket={socket}")
            }
        }
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; `None` if malformed.
fn split_host_port(authority: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-' | '_' | ':'));
    if !host_ok || (host.contains(':') && !authority.starts_with('[')) {
        return None;
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u16>().ok().filter(|&p| p != 0)?
        }
        Some(_) => return None,
    };
    Some((host.to_owned(), port))
}

/// Decodes `%XX` escapes; `None` on a bad escape or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = char::from(bytes.next()?).to_digit(16)?;
            let lo = char::from(bytes.next()?).to_digit(16)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// Characters left as they are in the export name (a URI path).
const PATH_SAFE: &str = "-._~!$&'()*+,;=:@/";
/// Characters left as they are in the socket path (a query value).
const QUERY_SAFE: &str = "-._~!$'()*,;:@/";

fn percent_encode(s: &str, safe: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || safe.as_bytes().contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn uri_forms_parse_and_print_back() {
        let u = NbdUri::parse("nbd://example.com/disk0").unwrap();
        assert_eq!(u.tcp_address(), Some(("example.com", 10809)));
        assert_eq!(u.export(), "disk0");
        assert_eq!(u.to_string(), "nbd://example.com/disk0");

        let u = NbdUri::parse("nbd://10.0.0.1:10900/").unwrap();
        assert_eq!(u.tcp_address(), Some(("10.0.0.1", 10900)));
        assert_eq!(u.export(), "");
        assert_eq!(u.to_string(), "nbd://10.0.0.1:10900/");
        assert_eq!(NbdUri::parse("nbd://h").unwrap().export(), "");

        let u = NbdUri::parse("nbd://[::1]:10810/a%20b/c").unwrap();
        assert_eq!(u.tcp_address(), Some(("::1", 10810)));
        assert_eq!(u.export(), "a b/c");
        assert_eq!(u.to_string(), "nbd://[::1]:10810/a%20b/c");

        let u = NbdUri::parse("nbd+unix:///exp?socket=/run/blockmirror/nbd.sock").unwrap();
        assert_eq!(
            u.socket_path(),
            Some(Path::new("/run/blockmirror/nbd.sock"))
        );
        assert_eq!(u.tcp_address(), None);
        assert_eq!(u.export(), "exp");
        assert_eq!(
            u.to_string(),
            "nbd+unix:///exp?socket=/run/blockmirror/nbd.sock"
        );
        let u: NbdUri = "nbd+unix://?socket=/s%26x.sock".parse().unwrap();
        assert_eq!(u.export(), "");
        assert_eq!(u.socket_path(), Some(Path::new("/s&x.sock")));
        assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);

        for bad in [
            "nbds://host/exp",
            "nbds+unix:///exp?socket=/s",
            "nbd+unix:///exp",
            "nbd+unix:///exp?socket=",
            "nbd+unix:///exp?socket=/a&socket=/b",
            "nbd+unix:///exp?socket=/a&tls=on",
            "nbd+unix://host/exp?socket=/s",
            "nbd://host/exp?socket=/s",
            "nbd:///exp",
            "nbd://:10809/exp",
            "nbd://host:0/exp",
            "nbd://host:99999/exp",
            "nbd://host:+1/exp",
            "nbd://host:/exp",
            "nbd://::1/exp",
            "nbd://user@host/exp",
            "nbd://host/exp#frag",
            "nbd://host/%zz",
            "http://host/exp",
            "garbage",
            "",
        ] {
            let e = NbdUri::parse(bad).expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
            assert!(e.to_string().contains(URI_FORMS), "{bad}: {e}");
        }
    }
}
