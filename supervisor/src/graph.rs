//! The domain graph: which domains run, in which groups (sandboxed processes),
//! joined by which channels, holding which capabilities (docs/graph.md).
//!
//! A graph file is TOML. [`Graph::parse`] reads one and checks everything a
//! supervisor would otherwise find out half-way through starting it: every name
//! it mentions exists, every domain is in exactly one group, every channel joins
//! two domains that have a protocol between them and is held by both, every
//! capability is granted with rights its grantor has. A refusal names the line
//! and the reason. The built-in graphs are [`DEFAULT`] (fully factored) and
//! [`MONO`] (one group).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::ops::Range;

use capnet_kernel_shim::spawn::Namespaces;
use serde::Deserialize;
use toml::Spanned;

/// The built-in graph: every domain its own sandboxed process.
pub const DEFAULT: &str = include_str!("../graphs/default.toml");
/// The one-group graph (`--mono`): every domain in one sandboxed process.
pub const MONO: &str = include_str!("../graphs/mono.toml");
/// Two groups (`--two-group`): the driver | everything else.
pub const TWO_GROUP: &str = include_str!("../graphs/two-group.toml");
/// Three groups: the driver | ip | the transports with the sockets domain.
pub const THREE_GROUP: &str = include_str!("../graphs/three-group.toml");

pub use capnet_proto::Kind;

/// The pairs of kinds that have a protocol between them, each with what the
/// stack cannot do without it.
pub const PROTOCOLS: [(Kind, Kind, &str); 6] = [
    (Kind::Driver, Kind::Ip, "no frame could reach the device"),
    (Kind::Ip, Kind::Tcp, "no TCP segment could be sent or received"),
    (Kind::Ip, Kind::Udp, "no UDP datagram could be sent or received"),
    (Kind::Ip, Kind::Sockets, "ping (ICMP echo sockets) could not work"),
    (Kind::Tcp, Kind::Sockets, "applications could not reach TCP"),
    (Kind::Udp, Kind::Sockets, "applications could not reach UDP"),
];

/// Rights on a capability (kernel-shim's mask, by name in graph files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rights(u8);

impl Rights {
    /// Read it.
    pub const READ: Rights = Rights(1);
    /// Write it.
    pub const WRITE: Rights = Rights(2);
    /// Map it.
    pub const MAP: Rights = Rights(4);
    /// Pass it on.
    pub const GRANT: Rights = Rights(8);
    const NAMES: [(Rights, &'static str); 4] =
        [(Rights::READ, "read"), (Rights::WRITE, "write"), (Rights::MAP, "map"), (Rights::GRANT, "grant")];

    /// Both sets.
    pub const fn union(self, o: Rights) -> Rights {
        Rights(self.0 | o.0)
    }

    /// Whether every right in `o` is in `self`.
    pub fn contains(self, o: Rights) -> bool {
        self.0 & o.0 == o.0
    }

    /// The kernel-shim mask with the same rights.
    pub fn to_shim(self) -> capnet_kernel_shim::cap::Rights {
        use capnet_kernel_shim::cap::Rights as R;
        let pairs =
            [(Rights::READ, R::READ), (Rights::WRITE, R::WRITE), (Rights::MAP, R::MAP), (Rights::GRANT, R::GRANT)];
        pairs.into_iter().filter(|(g, _)| self.contains(*g)).fold(R::empty(), |acc, (_, r)| acc | r)
    }
}

impl fmt::Display for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = Self::NAMES.iter().filter(|(r, _)| self.contains(*r)).map(|(_, n)| *n).collect();
        f.write_str(&names.join(", "))
    }
}

/// A capability a graph names: `device:NAME`, `channel:NAME` or `region:NAME`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum CapRef {
    /// A device the supervisor opens.
    Device(String),
    /// The other end of a channel (its area and pool, sealed by their writer).
    Channel(String),
    /// A region its owner domain writes.
    Region(String),
}

impl fmt::Display for CapRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CapRef::Device(n) => write!(f, "device:{n}"),
            CapRef::Channel(n) => write!(f, "channel:{n}"),
            CapRef::Region(n) => write!(f, "region:{n}"),
        }
    }
}

/// One capability granted to a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// What.
    pub cap: CapRef,
    /// With which rights.
    pub rights: Rights,
}

/// A domain of the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// Its name (unique in the graph).
    pub name: String,
    /// Which core it runs.
    pub kind: Kind,
    /// The program its group runs (a name next to `capnet`, or a path).
    pub binary: String,
    /// The capabilities it is granted.
    pub grants: Vec<Grant>,
}

/// How a group's process is confined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// Its uid (and gid): non-root, distinct per group.
    pub uid: u32,
    /// The namespaces of its own.
    pub namespaces: Namespaces,
    /// The seccomp policies (roles) whose union it runs under.
    pub seccomp: Vec<String>,
    /// `RLIMIT_NOFILE`.
    pub nofile: u64,
    /// `RLIMIT_AS` in MiB.
    pub address_space_mib: Option<u64>,
}

/// A group: one sandboxed process running one or more domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Its name.
    pub name: String,
    /// Its domains' names.
    pub domains: Vec<String>,
    /// Its confinement.
    pub sandbox: Sandbox,
}

/// A channel between two domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    /// Its name.
    pub name: String,
    /// The two domains it joins.
    pub ends: [String; 2],
}

/// Addresses the graph gives (the command line may override each).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addressing {
    /// The TAP's name.
    pub tap: Option<String>,
    /// The kernel's address on the TAP, with prefix.
    pub host_addr: Option<(Ipv4Addr, u8)>,
    /// The stack's address, with prefix.
    pub addr: Option<(Ipv4Addr, u8)>,
}

/// A checked graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    /// Addresses.
    pub addressing: Addressing,
    /// Devices the supervisor opens (name → kind; `tap` is the only kind).
    pub devices: BTreeMap<String, String>,
    /// Regions (name → owner domain).
    pub regions: BTreeMap<String, String>,
    /// Domains.
    pub domains: Vec<Domain>,
    /// Groups.
    pub groups: Vec<Group>,
    /// Channels.
    pub channels: Vec<Channel>,
}

/// A graph refused: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphError {
    /// The line (1-based) the problem is on, when it is on one.
    pub line: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for GraphError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

impl std::error::Error for GraphError {}

/// Parses `ADDRESS/PREFIX` (prefix 1–30).
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (a, p) = s.split_once('/').ok_or_else(|| format!("{s:?}: write ADDRESS/PREFIX, e.g. 10.77.0.2/24"))?;
    let addr: Ipv4Addr = a.parse().map_err(|_| format!("{a:?} is not an IPv4 address"))?;
    let prefix: u8 =
        p.parse().ok().filter(|p| (1..=30).contains(p)).ok_or_else(|| format!("prefix {p:?} must be 1 to 30"))?;
    Ok((addr, prefix))
}

// The file as written, with the position of everything a refusal may point at.
type S = Spanned<String>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGraph {
    #[serde(default)]
    addressing: RawAddressing,
    #[serde(default)]
    devices: BTreeMap<S, RawDevice>,
    #[serde(default)]
    regions: BTreeMap<S, RawRegion>,
    #[serde(default)]
    domains: BTreeMap<S, RawDomain>,
    #[serde(default)]
    groups: BTreeMap<S, RawGroup>,
    #[serde(default)]
    channels: BTreeMap<S, RawChannel>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAddressing {
    tap: Option<S>,
    host_addr: Option<S>,
    addr: Option<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    kind: S,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    owner: S,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDomain {
    kind: S,
    binary: S,
    #[serde(default)]
    grants: Vec<Spanned<RawGrant>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    cap: S,
    rights: Vec<S>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    domains: Vec<S>,
    uid: Spanned<u32>,
    namespaces: Vec<S>,
    seccomp: Spanned<Vec<S>>,
    #[serde(default)]
    rlimits: RawLimits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_nofile")]
    nofile: u64,
    address_space_mib: Option<u64>,
}

fn default_nofile() -> u64 {
    64
}

impl Default for RawLimits {
    fn default() -> Self {
        Self { nofile: default_nofile(), address_space_mib: None }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChannel {
    ends: Spanned<Vec<S>>,
}

/// Refusals are built against the text, to turn spans into lines.
struct Checker<'a> {
    text: &'a str,
}

impl Checker<'_> {
    fn at(&self, span: Range<usize>, reason: impl Into<String>) -> GraphError {
        let line = self.text[..span.start.min(self.text.len())].matches('\n').count() + 1;
        GraphError { line: Some(line), reason: reason.into() }
    }
}

fn nowhere(reason: impl Into<String>) -> GraphError {
    GraphError { line: None, reason: reason.into() }
}

impl Graph {
    /// Reads and checks a graph file's text.
    pub fn parse(text: &str) -> Result<Graph, GraphError> {
        let raw: RawGraph = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            GraphError { line, reason: e.message().to_owned() }
        })?;
        let c = Checker { text };

        let cidr = |v: &Option<S>, what: &str| -> Result<Option<(Ipv4Addr, u8)>, GraphError> {
            v.as_ref()
                .map(|s| parse_cidr(s.get_ref()).map_err(|e| c.at(s.span(), format!("addressing.{what}: {e}"))))
                .transpose()
        };
        let addressing = Addressing {
            tap: raw.addressing.tap.as_ref().map(|t| t.get_ref().clone()),
            host_addr: cidr(&raw.addressing.host_addr, "host_addr")?,
            addr: cidr(&raw.addressing.addr, "addr")?,
        };

        let mut devices = BTreeMap::new();
        for (name, d) in &raw.devices {
            if d.kind.get_ref() != "tap" {
                return Err(c.at(
                    d.kind.span(),
                    format!("device {}: kind {:?} is not one capnet opens (tap)", name.get_ref(), d.kind.get_ref()),
                ));
            }
            devices.insert(name.get_ref().clone(), d.kind.get_ref().clone());
        }

        // Domains: their kinds, one of each.
        let mut domains = Vec::new();
        let mut by_kind: BTreeMap<Kind, &S> = BTreeMap::new();
        for (name, d) in &raw.domains {
            let kind = Kind::parse(d.kind.get_ref()).ok_or_else(|| {
                c.at(
                    d.kind.span(),
                    format!(
                        "domain {}: unknown kind {:?} (driver, ip, tcp, udp, sockets)",
                        name.get_ref(),
                        d.kind.get_ref()
                    ),
                )
            })?;
            if let Some(first) = by_kind.insert(kind, name) {
                return Err(c.at(
                    name.span(),
                    format!(
                        "domain {} is a second {kind} domain beside {}: one domain of each kind runs at a time",
                        name.get_ref(),
                        first.get_ref()
                    ),
                ));
            }
            if d.binary.get_ref().trim().is_empty() {
                return Err(c.at(d.binary.span(), format!("domain {}: an empty binary", name.get_ref())));
            }
            domains.push(Domain {
                name: name.get_ref().clone(),
                kind,
                binary: d.binary.get_ref().clone(),
                grants: Vec::new(),
            });
        }
        for k in Kind::ALL {
            if !by_kind.contains_key(&k) {
                return Err(nowhere(format!("the graph has no {k} domain: a stack needs one of each kind")));
            }
        }
        let domain_kind = |n: &str| domains.iter().find(|d| d.name == n).map(|d| d.kind);

        let mut regions = BTreeMap::new();
        for (name, r) in &raw.regions {
            if domain_kind(r.owner.get_ref()) != Some(Kind::Ip) || name.get_ref() != "routes" {
                return Err(c.at(
                    name.span(),
                    format!(
                        "region {}: the one region domains publish is `routes`, owned by the ip domain",
                        name.get_ref()
                    ),
                ));
            }
            regions.insert(name.get_ref().clone(), r.owner.get_ref().clone());
        }

        // Channels: two known, different domains with a protocol between them.
        let mut channels = Vec::new();
        let mut pairs: BTreeMap<(Kind, Kind), &S> = BTreeMap::new();
        for (name, ch) in &raw.channels {
            let ends = ch.ends.get_ref();
            let [a, b] = ends.as_slice() else {
                return Err(c.at(
                    ch.ends.span(),
                    format!("channel {} needs exactly two ends, not {}", name.get_ref(), ends.len()),
                ));
            };
            let mut kinds = [Kind::Driver; 2];
            for (i, e) in [a, b].into_iter().enumerate() {
                kinds[i] = domain_kind(e.get_ref()).ok_or_else(|| {
                    c.at(
                        e.span(),
                        format!("channel {} leads to nowhere: there is no domain {:?}", name.get_ref(), e.get_ref()),
                    )
                })?;
            }
            if a.get_ref() == b.get_ref() {
                return Err(c.at(ch.ends.span(), format!("channel {} joins {} to itself", name.get_ref(), a.get_ref())));
            }
            let pair = if kinds[0] <= kinds[1] { (kinds[0], kinds[1]) } else { (kinds[1], kinds[0]) };
            if !PROTOCOLS.iter().any(|(x, y, _)| (*x, *y) == pair) {
                return Err(c.at(
                    ch.ends.span(),
                    format!("channel {}: {} and {} have no protocol between them", name.get_ref(), pair.0, pair.1),
                ));
            }
            if let Some(first) = pairs.insert(pair, name) {
                return Err(c.at(
                    name.span(),
                    format!("channel {} joins the same domains as channel {}", name.get_ref(), first.get_ref()),
                ));
            }
            channels.push(Channel { name: name.get_ref().clone(), ends: [a.get_ref().clone(), b.get_ref().clone()] });
        }
        for (x, y, why) in PROTOCOLS {
            if !pairs.contains_key(&(x, y)) {
                return Err(nowhere(format!("no channel joins the {x} and {y} domains: {why}")));
            }
        }

        // Grants: a known object, rights its grantor has, held by who uses it.
        for ((name, d), dom) in raw.domains.iter().zip(domains.iter_mut()) {
            let mut seen = BTreeSet::new();
            for g in &d.grants {
                let g_ref = g.get_ref();
                let text = g_ref.cap.get_ref();
                let here = |reason: String| c.at(g_ref.cap.span(), format!("domain {}: {reason}", name.get_ref()));
                let (kind, object) = text.split_once(':').ok_or_else(|| {
                    here(format!("capability {text:?}: write device:NAME, channel:NAME or region:NAME"))
                })?;
                // What the grantor holds and may pass on.
                let (cap, grantor, holds) = match kind {
                    "device" => {
                        if !devices.contains_key(object) {
                            return Err(here(format!("there is no device {object:?}")));
                        }
                        if dom.kind != Kind::Driver {
                            return Err(here(format!(
                                "a {} domain has no use for device {object}: only a driver drives a device",
                                dom.kind
                            )));
                        }
                        (
                            CapRef::Device(object.into()),
                            "the supervisor".to_owned(),
                            Rights::READ.union(Rights::WRITE).union(Rights::GRANT),
                        )
                    }
                    "channel" => {
                        let ch = channels
                            .iter()
                            .find(|ch| ch.name == object)
                            .ok_or_else(|| here(format!("there is no channel {object:?}")))?;
                        let Some(me) = ch.ends.iter().position(|e| *e == dom.name) else {
                            return Err(here(format!(
                                "it is not an end of channel {object} ({} – {})",
                                ch.ends[0], ch.ends[1]
                            )));
                        };
                        let peer = ch.ends[1 - me].clone();
                        (
                            CapRef::Channel(object.into()),
                            format!("{peer}, which writes the other end and seals it,"),
                            Rights::READ.union(Rights::MAP).union(Rights::GRANT),
                        )
                    }
                    "region" => {
                        let owner =
                            regions.get(object).ok_or_else(|| here(format!("there is no region {object:?}")))?;
                        if *owner == dom.name {
                            return Err(here(format!(
                                "it owns region {object}: owners are not granted their own regions"
                            )));
                        }
                        (
                            CapRef::Region(object.into()),
                            format!("{owner}, which writes it and seals it,"),
                            Rights::READ.union(Rights::MAP).union(Rights::GRANT),
                        )
                    }
                    _ => return Err(here(format!("capability {text:?}: the kinds are device, channel and region"))),
                };
                let mut rights = Rights::default();
                for r in &g_ref.rights {
                    let bit =
                        Rights::NAMES.iter().find(|(_, n)| *n == r.get_ref()).map(|(b, _)| *b).ok_or_else(|| {
                            c.at(
                                r.span(),
                                format!(
                                    "domain {}: unknown right {:?} (read, write, map, grant)",
                                    name.get_ref(),
                                    r.get_ref()
                                ),
                            )
                        })?;
                    if !holds.contains(bit) {
                        return Err(c.at(
                            r.span(),
                            format!(
                                "domain {} asks for {} on {cap}, but {grantor} can grant only {holds}",
                                name.get_ref(),
                                r.get_ref()
                            ),
                        ));
                    }
                    rights = rights.union(bit);
                }
                if rights == Rights::default() {
                    return Err(here(format!("{cap} is granted with no rights")));
                }
                if !seen.insert(cap.clone()) {
                    return Err(here(format!("{cap} is granted twice")));
                }
                dom.grants.push(Grant { cap, rights });
            }
        }
        for ch in &channels {
            for end in &ch.ends {
                let dom = domains.iter().find(|d| d.name == *end).ok_or_else(|| nowhere("unreachable"))?;
                if !dom.grants.iter().any(|g| g.cap == CapRef::Channel(ch.name.clone())) {
                    let span =
                        raw.channels.iter().find(|(n, _)| *n.get_ref() == ch.name).map_or(0..0, |(n, _)| n.span());
                    return Err(c.at(
                        span,
                        format!("channel {}: its end {end} is not granted it, so it could not use it", ch.name),
                    ));
                }
            }
        }
        for dom in domains.iter().filter(|d| d.kind == Kind::Driver) {
            if !dom.grants.iter().any(|g| matches!(g.cap, CapRef::Device(_))) {
                let span = raw.domains.keys().find(|n| *n.get_ref() == dom.name).map_or(0..0, |n| n.span());
                return Err(c.at(span, format!("domain {}: a driver needs a device:NAME grant", dom.name)));
            }
        }

        // Groups: every domain in exactly one; one binary, policies for all it runs.
        let mut groups = Vec::new();
        let mut placed: BTreeMap<String, String> = BTreeMap::new();
        let mut uids: BTreeMap<u32, String> = BTreeMap::new();
        for (name, g) in &raw.groups {
            let gname = name.get_ref();
            if g.domains.is_empty() {
                return Err(c.at(name.span(), format!("group {gname} has no domains")));
            }
            let mut binary: Option<&str> = None;
            for d in &g.domains {
                let dom = domains
                    .iter()
                    .find(|x| x.name == *d.get_ref())
                    .ok_or_else(|| c.at(d.span(), format!("group {gname}: there is no domain {:?}", d.get_ref())))?;
                if let Some(other) = placed.insert(dom.name.clone(), gname.clone()) {
                    return Err(c.at(d.span(), format!("domain {} is in two groups: {other} and {gname}", dom.name)));
                }
                match binary {
                    Some(b) if b != dom.binary => {
                        return Err(c.at(
                            d.span(),
                            format!(
                                "group {gname} is one process, but its domains name two binaries ({b}, {})",
                                dom.binary
                            ),
                        ));
                    }
                    _ => binary = Some(&dom.binary),
                }
                if !g.seccomp.get_ref().iter().any(|p| p.get_ref() == dom.kind.name()) {
                    return Err(c.at(
                        g.seccomp.span(),
                        format!(
                            "group {gname} runs the {} domain but its seccomp list lacks the {} policy",
                            dom.kind, dom.kind
                        ),
                    ));
                }
            }
            let uid = *g.uid.get_ref();
            if uid == 0 {
                return Err(c.at(
                    g.uid.span(),
                    format!("group {gname}: uid 0 is root; a domain runs as a non-root uid of its own"),
                ));
            }
            if let Some(other) = uids.insert(uid, gname.clone()) {
                return Err(c.at(
                    g.uid.span(),
                    format!("group {gname} shares uid {uid} with group {other}: each group needs its own"),
                ));
            }
            let mut ns = Namespaces { user: false, pid: false, mount: false, net: false, ipc: false };
            for n in &g.namespaces {
                let flag = match n.get_ref().as_str() {
                    "user" => &mut ns.user,
                    "pid" => &mut ns.pid,
                    "mount" => &mut ns.mount,
                    "net" => &mut ns.net,
                    "ipc" => &mut ns.ipc,
                    other => {
                        return Err(c.at(
                            n.span(),
                            format!("group {gname}: unknown namespace {other:?} (user, pid, mount, net, ipc)"),
                        ))
                    }
                };
                *flag = true;
            }
            for p in g.seccomp.get_ref() {
                if !capnet_kernel_shim::sandbox::Policy::roles().any(|r| r == p.get_ref()) {
                    return Err(c.at(p.span(), format!("group {gname}: there is no seccomp policy {:?}", p.get_ref())));
                }
            }
            if !(16..=65536).contains(&g.rlimits.nofile) {
                return Err(c.at(
                    name.span(),
                    format!("group {gname}: rlimits.nofile {} is not between 16 and 65536", g.rlimits.nofile),
                ));
            }
            if g.rlimits.address_space_mib.is_some_and(|m| m < 256) {
                return Err(c.at(
                    name.span(),
                    format!("group {gname}: rlimits.address_space_mib below 256 cannot hold the channel pools"),
                ));
            }
            groups.push(Group {
                name: gname.clone(),
                domains: g.domains.iter().map(|d| d.get_ref().clone()).collect(),
                sandbox: Sandbox {
                    uid,
                    namespaces: ns,
                    seccomp: g.seccomp.get_ref().iter().map(|p| p.get_ref().clone()).collect(),
                    nofile: g.rlimits.nofile,
                    address_space_mib: g.rlimits.address_space_mib,
                },
            });
        }
        for name in raw.domains.keys() {
            if !placed.contains_key(name.get_ref()) {
                return Err(c.at(name.span(), format!("domain {} is in no group", name.get_ref())));
            }
        }
        Ok(Graph { addressing, devices, regions, domains, groups, channels })
    }

    /// The group a domain runs in.
    pub fn group_of(&self, domain: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.domains.iter().any(|d| d == domain))
    }

    /// The domain of a kind.
    pub fn domain(&self, kind: Kind) -> Option<&Domain> {
        self.domains.iter().find(|d| d.kind == kind)
    }

    /// Whether a channel crosses between groups (an ipc channel) rather than
    /// joining domains of one group (direct calls).
    pub fn crosses(&self, ch: &Channel) -> bool {
        self.group_of(&ch.ends[0]).map(|g| &g.name) != self.group_of(&ch.ends[1]).map(|g| &g.name)
    }

    /// A summary for people: the groups as processes, and how channels run.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for g in &self.groups {
            let ns: Vec<&str> = [
                (g.sandbox.namespaces.user, "user"),
                (g.sandbox.namespaces.pid, "pid"),
                (g.sandbox.namespaces.mount, "mount"),
                (g.sandbox.namespaces.net, "net"),
                (g.sandbox.namespaces.ipc, "ipc"),
            ]
            .into_iter()
            .filter_map(|(on, n)| on.then_some(n))
            .collect();
            s += &format!(
                "group {:<8} process of {:<28} uid {} namespaces [{}] seccomp [{}]\n",
                g.name,
                g.domains.join(" + "),
                g.sandbox.uid,
                ns.join(" "),
                g.sandbox.seccomp.join(" ")
            );
        }
        for ch in &self.channels {
            let how = if self.crosses(ch) { "ipc channel" } else { "direct calls (one group)" };
            s += &format!("channel {:<12} {} – {}: {how}\n", ch.name, ch.ends[0], ch.ends[1]);
        }
        for d in &self.domains {
            let grants: Vec<String> = d.grants.iter().map(|g| format!("{} ({})", g.cap, g.rights)).collect();
            s += &format!("domain {:<8} {} in {}: {}\n", d.name, d.kind, d.binary, grants.join(", "));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_graphs_are_valid() {
        let g = Graph::parse(DEFAULT).expect("default graph");
        assert_eq!(g.groups.len(), 5);
        assert!(g.channels.iter().all(|c| g.crosses(c)));
        let m = Graph::parse(MONO).expect("mono graph");
        assert_eq!(m.groups.len(), 1);
        assert!(m.channels.iter().all(|c| !m.crosses(c)));
    }
}
