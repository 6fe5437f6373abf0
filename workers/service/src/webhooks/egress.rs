//! Where a webhook may be sent: the guard against server-side request
//! forgery through `callback_url`. Pure: the caller resolves names and
//! hands the addresses in, so that the connection uses exactly the
//! addresses that were vetted (a second lookup could be rebound).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why a callback URL or address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not a URL ({0})")]
    NotAUrl(String),
    #[error("scheme `{0}` is refused: callbacks must use https")]
    Scheme(String),
    #[error(
        "plain http is refused for {0}: callbacks must use https (or be on the webhook allow-list)"
    )]
    Insecure(String),
    #[error("a user name or password in the URL is refused")]
    Userinfo,
    #[error("the URL has no host")]
    NoHost,
    #[error("{host} is {addr}, a {class} address; callbacks may only reach public addresses")]
    Address {
        host: String,
        addr: IpAddr,
        class: &'static str,
    },
    #[error("{0} resolves to no address")]
    Unresolved(String),
    #[error("the receiver answered {0}, a redirect; redirects are not followed")]
    Redirect(u16),
}

impl Refusal {
    /// A final refusal is never retried; a name that does not resolve now
    /// may resolve later.
    pub fn is_final(&self) -> bool {
        !matches!(self, Refusal::Unresolved(_))
    }
}

/// Hosts (optionally with a port) that may be reached over plain http and
/// at any address: test receivers and development setups only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<(String, Option<u16>)>,
}

impl AllowList {
    /// Entries are `host` or `host:port` (IPv6 hosts in brackets).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<AllowList, String> {
        let mut out = Vec::new();
        for e in entries {
            let e = e.as_ref().trim();
            if e.is_empty() {
                continue;
            }
            let url = url::Url::parse(&format!("http://{e}/"))
                .map_err(|err| format!("{e:?} is not host or host:port ({err})"))?;
            // Spelled as check_url spells hosts: IPv6 without brackets.
            let host = match url.host() {
                Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
                Some(url::Host::Ipv4(a)) => a.to_string(),
                Some(url::Host::Ipv6(a)) => a.to_string(),
                _ => return Err(format!("{e:?} has no host")),
            };
            if url.path() != "/" || !url.username().is_empty() || url.query().is_some() {
                return Err(format!("{e:?} is not host or host:port"));
            }
            out.push((host.to_ascii_lowercase(), url.port()));
        }
        Ok(AllowList { entries: out })
    }

    /// Whether `host:port` is on the list (an entry without a port allows every port).
    pub fn permits(&self, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        self.entries
            .iter()
            .any(|(h, p)| *h == host && p.is_none_or(|p| p == port))
    }

    /// Whether `host` is on the list at some port (what a resolver, which
    /// does not see the port, can check).
    pub fn permits_host(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.entries.iter().any(|(h, _)| *h == host)
    }
}

/// A callback URL that passed the checks that need no lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The host as the URL spells it (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// The host's address where the URL gives one; otherwise it must be
    /// resolved and the addresses passed through [`vet`].
    pub literal: Option<IpAddr>,
    /// On the allow-list: any scheme of http(s), any address.
    pub allowed: bool,
}

/// Checks a callback URL without resolving it: https (http only for
/// allow-listed hosts), no userinfo, a host, and a public address where the
/// host is an IP literal.
pub fn check_url(raw: &str, allow: &AllowList) -> Result<Target, Refusal> {
    let url = url::Url::parse(raw).map_err(|e| Refusal::NotAUrl(e.to_string()))?;
    let scheme = url.scheme();
    if scheme != "https" && scheme != "http" {
        return Err(Refusal::Scheme(scheme.to_string()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Refusal::Userinfo);
    }
    let (host, literal) = match url.host() {
        None => return Err(Refusal::NoHost),
        Some(url::Host::Domain("")) => return Err(Refusal::NoHost),
        Some(url::Host::Domain(d)) => (d.to_ascii_lowercase(), None),
        Some(url::Host::Ipv4(a)) => (a.to_string(), Some(IpAddr::V4(a))),
        Some(url::Host::Ipv6(a)) => (a.to_string(), Some(IpAddr::V6(a))),
    };
    let port = url.port_or_known_default().unwrap_or(443);
    let allowed = allow.permits(&host, port);
    if scheme == "http" && !allowed {
        return Err(Refusal::Insecure(host));
    }
    if let (Some(addr), false) = (literal, allowed) {
        vet(&host, &[addr], false)?;
    }
    Ok(Target {
        host,
        port,
        literal,
        allowed,
    })
}

/// The addresses a connection to `host` may use: all of them, or a refusal
/// when any is not public (a name with one private address among public
/// ones is refused, not filtered: it is pointed at the inside on purpose).
pub fn vet(host: &str, addrs: &[IpAddr], allowed: bool) -> Result<Vec<IpAddr>, Refusal> {
    if addrs.is_empty() {
        return Err(Refusal::Unresolved(host.to_string()));
    }
    if !allowed {
        if let Some((addr, class)) = addrs
            .iter()
            .find_map(|a| forbidden_class(*a).map(|c| (*a, c)))
        {
            return Err(Refusal::Address {
                host: host.to_string(),
                addr,
                class,
            });
        }
    }
    Ok(addrs.to_vec())
}

/// The class of a non-public address, or None for a public one.
pub fn forbidden_class(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(a) => v4_class(a),
        IpAddr::V6(a) => v6_class(a),
    }
}

fn v4_class(a: Ipv4Addr) -> Option<&'static str> {
    let [o0, o1, o2, _] = a.octets();
    Some(match (o0, o1, o2) {
        (0, _, _) => "unspecified (0.0.0.0/8)",
        (127, _, _) => "loopback",
        (10, _, _) => "private (10.0.0.0/8)",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 168, _) => "private (192.168.0.0/16)",
        (169, 254, _) => "link-local (169.254.0.0/16, cloud metadata)",
        (100, 64..=127, _) => "CGNAT (100.64.0.0/10)",
        (192, 0, 0) => "IETF protocol assignment (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved or broadcast (240.0.0.0/4)",
        _ => return None,
    })
}

fn v6_class(a: Ipv6Addr) -> Option<&'static str> {
    // IPv4 carried in IPv6 reaches the IPv4 address: judge that.
    if let Some(v4) = a.to_ipv4_mapped() {
        return v4_class(v4);
    }
    let s = a.segments();
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return v4_class(v4);
    }
    Some(match s[0] {
        _ if a.is_unspecified() => "unspecified",
        _ if a.is_loopback() => "loopback",
        // ::a.b.c.d, the deprecated IPv4-compatible form.
        0 if s[1..6] == [0, 0, 0, 0, 0] => "IPv4-compatible (deprecated)",
        x if x & 0xfe00 == 0xfc00 => "unique local (fc00::/7)",
        x if x & 0xffc0 == 0xfe80 => "link-local (fe80::/10)",
        x if x & 0xffc0 == 0xfec0 => "site-local (fec0::/10)",
        x if x & 0xff00 == 0xff00 => "multicast",
        0x2001 if s[1] == 0x0db8 => "documentation (2001:db8::/32)",
        // 6to4 embeds an IPv4 address that may be private.
        0x2002 => {
            let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
            return v4_class(v4);
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn none() -> AllowList {
        AllowList::default()
    }

    #[test]
    fn every_non_public_range_is_refused() {
        for (addr, class) in [
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "CGNAT"),
            ("100.127.255.255", "CGNAT"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("198.18.0.1", "benchmarking"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fc00::1", "unique local"),
            ("fd12:3456::1", "unique local"),
            ("fe80::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:c0a8:0101::1", "private"),
            ("::7f00:1", "IPv4-compatible"),
            ("2001:db8::1", "documentation"),
        ] {
            let ip: IpAddr = addr.parse().unwrap();
            let got = forbidden_class(ip);
            assert!(
                got.is_some_and(|c| c.contains(class)),
                "{addr}: {got:?}, expected {class}"
            );
        }
    }

    #[test]
    fn public_addresses_pass() {
        for addr in [
            "1.1.1.1",
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "192.169.0.1",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "64:ff9b::808:808",
        ] {
            let ip: IpAddr = addr.parse().unwrap();
            assert_eq!(forbidden_class(ip), None, "{addr}");
        }
    }

    #[test]
    fn names_are_judged_by_every_address_they_resolve_to() {
        let public: IpAddr = "93.184.215.14".parse().unwrap();
        let inside: IpAddr = "10.0.0.5".parse().unwrap();
        assert_eq!(vet("hooks.example.com", &[public], false), Ok(vec![public]));
        // A rebinding or split-horizon name with one inside address is refused whole.
        let err = vet("rebind.example.com", &[public, inside], false).unwrap_err();
        assert!(matches!(err, Refusal::Address { addr, .. } if addr == inside));
        assert!(err.is_final());
        let none_err = vet("nx.example.com", &[], false).unwrap_err();
        assert_eq!(none_err, Refusal::Unresolved("nx.example.com".into()));
        assert!(!none_err.is_final(), "a name may resolve later");
        // The allow-list lets a test receiver on loopback through.
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(vet("localhost", &[lo], true), Ok(vec![lo]));
    }

    #[test]
    fn urls_need_https_a_host_and_no_userinfo() {
        let t = check_url("https://hooks.example.com/recap", &none()).unwrap();
        assert_eq!(
            t,
            Target {
                host: "hooks.example.com".into(),
                port: 443,
                literal: None,
                allowed: false
            }
        );
        for (url, want) in [
            ("http://hooks.example.com/x", "https"),
            ("ftp://hooks.example.com/x", "scheme"),
            ("file:///etc/passwd", "scheme"),
            ("gopher://127.0.0.1:6379/_x", "scheme"),
            ("https://user:pw@hooks.example.com/", "user name"),
            ("https://user@hooks.example.com/", "user name"),
            ("https://127.0.0.1/", "loopback"),
            ("https://169.254.169.254/latest/meta-data/", "link-local"),
            ("https://[::1]:8443/", "loopback"),
            ("https://[::ffff:7f00:1]/", "loopback"),
            ("https://0x7f000001/", "loopback"),
            ("https://2130706433/", "loopback"),
            ("https://017700000001/", "loopback"),
            ("https://10.0.0.1:8080/", "private"),
            ("https://0/", "unspecified"),
            ("not a url", "not a URL"),
        ] {
            let err = check_url(url, &none()).unwrap_err().to_string();
            assert!(err.contains(want), "{url}: {err}");
        }
    }

    #[test]
    fn the_allow_list_admits_http_and_inside_addresses_for_its_hosts_only() {
        let allow = AllowList::parse(&["127.0.0.1:8080", "Receiver.test", "[::1]"]).unwrap();
        let t = check_url("http://127.0.0.1:8080/hook", &allow).unwrap();
        assert!(t.allowed && t.literal == Some("127.0.0.1".parse().unwrap()));
        assert!(
            check_url("http://127.0.0.1:8081/hook", &allow).is_err(),
            "other port"
        );
        assert!(
            check_url("http://receiver.test:9/x", &allow)
                .unwrap()
                .allowed
        );
        assert!(check_url("http://[::1]:5/x", &allow).unwrap().allowed);
        assert!(allow.permits_host("RECEIVER.test"));
        assert!(!allow.permits_host("other.test"));
        // Userinfo stays refused on the allow-list too.
        assert_eq!(
            check_url("http://u:p@127.0.0.1:8080/", &allow),
            Err(Refusal::Userinfo)
        );
        for bad in ["http://x", "a/b", "u@h", "h:99999"] {
            assert!(AllowList::parse(&[bad]).is_err(), "{bad}");
        }
        assert_eq!(AllowList::parse(&[" ", ""]).unwrap(), AllowList::default());
    }

    proptest! {
        #[test]
        fn a_v4_address_and_its_mapped_v6_form_get_the_same_verdict(bits in any::<u32>()) {
            let v4 = Ipv4Addr::from(bits);
            prop_assert_eq!(
                forbidden_class(IpAddr::V4(v4)),
                forbidden_class(IpAddr::V6(v4.to_ipv6_mapped()))
            );
        }

        #[test]
        fn an_https_url_to_a_v4_literal_passes_only_when_public(bits in any::<u32>()) {
            let v4 = Ipv4Addr::from(bits);
            let verdict = check_url(&format!("https://{v4}/hook"), &AllowList::default());
            prop_assert_eq!(verdict.is_ok(), forbidden_class(IpAddr::V4(v4)).is_none());
        }
    }
}
