//! `[heartbeat]` and its links; and their validation.

use super::*;

/// `[heartbeat]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Heartbeat {
    pub keepalive_ms: u64,
    pub warntime_ms: u64,
    pub deadtime_ms: u64,
    pub initdead_ms: u64,
    /// `[[heartbeat.link]]`.
    pub link: Vec<Link>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            keepalive_ms: 200,
            warntime_ms: 600,
            deadtime_ms: 1000,
            initdead_ms: 10_000,
            link: vec![],
        }
    }
}

/// udp | serial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    /// UDP unicast.
    Udp,
    /// RS-232.
    Serial,
}

/// none | rtscts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    /// No flow control.
    #[default]
    None,
    /// Hardware RTS/CTS.
    Rtscts,
}

/// `[[heartbeat.link]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub kind: LinkKind,
    /// Serial only; default 115200.
    pub baud: Option<u32>,
    /// Serial only; default none.
    pub flow_control: Option<FlowControl>,
    /// `[heartbeat.link.on.NAME]`.
    #[serde(default)]
    pub on: BTreeMap<String, LinkOn>,
}

/// `[heartbeat.link.on.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkOn {
    /// UDP: local address.
    #[serde(default, deserialize_with = "syntax::socket_opt")]
    pub bind: Option<SocketAddr>,
    /// UDP: the peer's address.
    #[serde(default, deserialize_with = "syntax::socket_opt")]
    pub peer: Option<SocketAddr>,
    /// Serial: device path.
    pub device: Option<PathBuf>,
}

impl LinkOn {
    /// A udp link's two ends (`bind`, `peer`), both required by validation.
    pub fn udp(&self) -> Option<(SocketAddr, SocketAddr)> {
        Some((self.bind?, self.peer?))
    }
}

impl Config {
    pub(super) fn validate_heartbeat(&self) -> Result<(), ConfigError> {
        let h = &self.heartbeat;
        positive("heartbeat.keepalive_ms", h.keepalive_ms)?;
        if h.deadtime_ms <= 2 * h.keepalive_ms {
            return Err(invalid(
                "heartbeat.deadtime_ms",
                h.deadtime_ms,
                &format!("must be more than 2 x keepalive_ms ({})", 2 * h.keepalive_ms),
                "raise deadtime_ms or lower keepalive_ms",
            ));
        }
        if h.warntime_ms < h.keepalive_ms || h.warntime_ms >= h.deadtime_ms {
            return Err(invalid(
                "heartbeat.warntime_ms",
                h.warntime_ms,
                "must be at least keepalive_ms and less than deadtime_ms",
                "e.g. warntime_ms = 600 with keepalive 200 and deadtime 1000",
            ));
        }
        if h.initdead_ms < h.deadtime_ms {
            return Err(invalid(
                "heartbeat.initdead_ms",
                h.initdead_ms,
                "must be at least deadtime_ms",
                "e.g. initdead_ms = 10000",
            ));
        }
        for (i, l) in h.link.iter().enumerate() {
            let k = |f: &str| format!("heartbeat.link[{i}].{f}");
            for n in l.on.keys() {
                if !self.node.contains_key(n) {
                    return Err(invalid(
                        k(&format!("on.{n}")),
                        n,
                        "not a configured node",
                        "use the names of [node.NAME] sections",
                    ));
                }
            }
            match l.kind {
                LinkKind::Udp => {
                    if l.baud.is_some() || l.flow_control.is_some() {
                        return Err(invalid(
                            k("baud"),
                            l.baud.unwrap_or(0),
                            "baud and flow_control apply to serial links only",
                            "remove them from this udp link",
                        ));
                    }
                }
                LinkKind::Serial => {
                    if let Some(b) = l.baud
                        && !::heartbeat::serial::valid_baud(b)
                    {
                        return Err(invalid(
                            k("baud"),
                            b,
                            "not a standard baud rate",
                            "use e.g. 9600, 38400 or 115200",
                        ));
                    }
                }
            }
            for n in self.node.keys() {
                let kn = |f: &str| format!("heartbeat.link[{i}].on.{n}.{f}");
                let Some(on) = l.on.get(n) else {
                    return Err(invalid(
                        format!("heartbeat.link[{i}].on.{n}"),
                        "",
                        "missing",
                        &format!("add [heartbeat.link.on.{n}] for node {n}"),
                    ));
                };
                match l.kind {
                    LinkKind::Udp => {
                        for (key, v) in [("bind", on.bind), ("peer", on.peer)] {
                            if v.is_none() {
                                return Err(invalid(
                                    kn(key),
                                    "",
                                    "missing; a udp link needs both ends",
                                    "e.g. bind = \"192.0.2.1:694\", peer = \"192.0.2.2:694\"",
                                ));
                            }
                        }
                        if on.device.is_some() {
                            return Err(invalid(
                                kn("device"),
                                "",
                                "device applies to serial links only",
                                "remove it from this udp link",
                            ));
                        }
                    }
                    LinkKind::Serial => {
                        match &on.device {
                            Some(d) if d.is_absolute() => {}
                            d => {
                                let v =
                                    d.as_ref().map(|d| d.display().to_string()).unwrap_or_default();
                                return Err(invalid(
                                    kn("device"),
                                    v,
                                    "a serial link needs an absolute device path",
                                    "e.g. device = \"/dev/ttyS0\"",
                                ));
                            }
                        }
                        if on.bind.is_some() || on.peer.is_some() {
                            return Err(invalid(
                                kn("bind"),
                                "",
                                "bind and peer apply to udp links only",
                                "remove them from this serial link",
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
