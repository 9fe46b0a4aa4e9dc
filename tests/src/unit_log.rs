//! Every VM unit's starts and stops on every simulated host, as the host's own systemd
//! manager reports them over D-Bus, for [`crate::exactly_once`].
//!
//! A [`Watch`] is one connection to a host's manager: it adds a match rule for the manager's
//! signals, calls `Subscribe`, and keeps every `PropertiesChanged` of a `blixard-vm-*` unit's
//! `org.freedesktop.systemd1.Unit` interface and every `UnitRemoved` as a [`Record`]. systemd
//! sends all of that interface's timestamps with each change, so an interval is systemd's own
//! `[InactiveExitTimestamp, InactiveEnterTimestamp]` (CLOCK_REALTIME µs, the clock of
//! [`now_us`]): from the unit leaving `inactive` to it being `inactive` or `failed` again, which
//! covers every moment its processes can exist. The time a signal arrived stands in only when
//! systemd gave no timestamp. A host killed with `cgroup.kill` sends nothing more: the test
//! records [`UnitLog::host_ended`] with the time the kill finished, and that ends every
//! interval still open there. [`intervals`] is the pure part that turns records into intervals.
//!
//! The log never decides from the order signals arrive alone: a whole start-and-stop folded
//! into one signal (systemd coalesces changes within one loop iteration) still shows as an
//! interval, because its `InactiveExitTimestamp` is new.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use zbus::{MatchRule, MessageStream};
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

use crate::exactly_once::Interval;
use crate::host::SimHost;

const SYSTEMD: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER_IFACE: &str = "org.freedesktop.systemd1.Manager";
const UNIT_IFACE: &str = "org.freedesktop.systemd1.Unit";
const UNIT_PATH_PREFIX: &str = "/org/freedesktop/systemd1/unit/";

/// CLOCK_REALTIME in microseconds: the clock of systemd's timestamps and of the test's events.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// What one host's manager said about one VM unit, or the end of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A change of the unit's `Unit` interface.
    Changed {
        host: String,
        vm: String,
        received_us: u64,
        active_state: Option<String>,
        /// `InactiveExitTimestamp` (0 and absent are `None`).
        inactive_exit_us: Option<u64>,
        /// `InactiveEnterTimestamp` (0 and absent are `None`).
        inactive_enter_us: Option<u64>,
    },
    /// `UnitRemoved`: the unit was unloaded.
    Removed {
        host: String,
        vm: String,
        received_us: u64,
    },
    /// Every process of the host is gone (killed) by `at_us`.
    HostEnded { host: String, at_us: u64 },
}

/// Whether a unit in `state` may have processes (anything but `inactive` and `failed`).
fn is_up(state: &str) -> bool {
    !matches!(state, "inactive" | "failed")
}

/// The VM of a unit name `blixard-vm-NAME.service`.
pub fn vm_of_unit(unit: &str) -> Option<&str> {
    unit.strip_prefix("blixard-vm-")?.strip_suffix(".service")
}

/// The unit name of a unit object path (systemd escapes each byte but `[A-Za-z0-9]` as `_xx`).
pub fn unit_of_path(path: &str) -> Option<String> {
    let label = path.strip_prefix(UNIT_PATH_PREFIX)?.as_bytes();
    let mut out = Vec::with_capacity(label.len());
    let mut i = 0;
    while i < label.len() {
        if label[i] == b'_' {
            let hex = std::str::from_utf8(label.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(label[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Turns records into intervals: per host and VM, in the order they arrived. An interval
/// open at a [`Record::HostEnded`] of its host (the first at or after its start) ends there;
/// one still open after every record stays open (`end_us: None`).
pub fn intervals(records: &[Record]) -> Vec<Interval> {
    #[derive(Default)]
    struct Unit {
        done: Vec<(u64, u64)>,
        open: Option<u64>,
        /// The newest activation start seen (open or closed).
        last_start: Option<u64>,
    }
    let mut units: BTreeMap<(String, String), Unit> = BTreeMap::new();
    let mut ends: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in records {
        match r {
            Record::Changed {
                host,
                vm,
                received_us,
                active_state,
                inactive_exit_us,
                inactive_enter_us,
            } => {
                let u = units.entry((host.clone(), vm.clone())).or_default();
                let exit = *inactive_exit_us;
                let enter = *inactive_enter_us;
                // An activation this record shows that is newer than any seen.
                let new_start = exit.filter(|x| u.last_start.is_none_or(|l| *x > l));
                let up = active_state.as_deref().is_some_and(is_up);
                if let (Some(s), Some(x)) = (u.open, new_start) {
                    // The open one ended and another started without us seeing the stop.
                    let end = enter.filter(|e| *e >= s && *e <= x).unwrap_or(x);
                    u.done.push((s, end));
                    u.open = None;
                }
                if up {
                    if u.open.is_none() {
                        let s = new_start.unwrap_or(*received_us);
                        u.open = Some(s);
                        u.last_start = Some(u.last_start.map_or(s, |l| l.max(s)));
                    }
                } else if active_state.is_some() {
                    match (u.open.take(), new_start) {
                        (Some(s), _) => {
                            let end = enter.filter(|e| *e >= s).unwrap_or(*received_us);
                            u.done.push((s, end.max(s)));
                        }
                        (None, Some(x)) => {
                            // A whole start and stop folded into this one change.
                            let end = enter.filter(|e| *e >= x).unwrap_or(*received_us);
                            u.done.push((x, end.max(x)));
                            u.last_start = Some(x);
                        }
                        (None, None) => {}
                    }
                }
            }
            Record::Removed {
                host,
                vm,
                received_us,
            } => {
                if let Some(u) = units.get_mut(&(host.clone(), vm.clone())) {
                    if let Some(s) = u.open.take() {
                        u.done.push((s, (*received_us).max(s)));
                    }
                }
            }
            Record::HostEnded { host, at_us } => {
                ends.entry(host.clone()).or_default().push(*at_us);
            }
        }
    }
    let mut out = Vec::new();
    for ((host, vm), u) in units {
        let host_ends = ends.get(&host).cloned().unwrap_or_default();
        let end_of = |s: u64, e: u64| {
            // A host kill between start and end ends it earlier (its units died then).
            host_ends
                .iter()
                .copied()
                .filter(|k| *k >= s && *k < e)
                .min()
                .unwrap_or(e)
        };
        for (s, e) in u.done {
            out.push(Interval {
                vm: vm.clone(),
                host: host.clone(),
                start_us: s,
                end_us: Some(end_of(s, e)),
            });
        }
        if let Some(s) = u.open {
            let killed = host_ends.iter().copied().filter(|k| *k >= s).min();
            out.push(Interval {
                vm: vm.clone(),
                host: host.clone(),
                start_us: s,
                end_us: killed,
            });
        }
    }
    out.sort();
    out
}

/// The records of every host of a run. Clones share them.
#[derive(Debug, Clone, Default)]
pub struct UnitLog {
    records: Arc<Mutex<Vec<Record>>>,
}

impl UnitLog {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&self, r: Record) {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(r);
    }

    /// Every process of `host` is gone (after a `cgroup.kill`) by `at_us`.
    pub fn host_ended(&self, host: &str, at_us: u64) {
        self.push(Record::HostEnded {
            host: host.to_string(),
            at_us,
        });
    }

    pub fn records(&self) -> Vec<Record> {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// [`intervals`] of everything recorded so far.
    pub fn intervals(&self) -> Vec<Interval> {
        intervals(&self.records())
    }

    /// Starts recording `host`'s VM units: call it before anything starts a unit there.
    pub async fn watch(&self, host: &SimHost) -> anyhow::Result<Watch> {
        let conn = host.connect().await?;
        let rule = MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(SYSTEMD)
            .build()?;
        // A full queue stops reading (nothing is dropped); the task below empties it.
        let mut stream =
            MessageStream::for_match_rule(rule, &conn, std::num::NonZeroUsize::new(1 << 20))
                .await?;
        conn.call_method(
            Some(SYSTEMD),
            MANAGER_PATH,
            Some(MANAGER_IFACE),
            "Subscribe",
            &(),
        )
        .await?;
        let log = self.clone();
        let name = host.name().to_string();
        let task = tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                let Ok(msg) = msg else { continue };
                let received_us = now_us();
                if let Some(r) = parse(&name, &msg, received_us) {
                    log.push(r);
                }
            }
        });
        Ok(Watch {
            host: host.name().to_string(),
            conn,
            task: Some(task),
        })
    }
}

fn parse(host: &str, msg: &zbus::Message, received_us: u64) -> Option<Record> {
    let header = msg.header();
    match header.member()?.as_str() {
        "PropertiesChanged" => {
            let unit = unit_of_path(header.path()?.as_str())?;
            let vm = vm_of_unit(&unit)?.to_string();
            let (iface, changed, _invalidated): (
                String,
                HashMap<String, OwnedVariant>,
                Vec<String>,
            ) = msg.body().deserialize().ok()?;
            if iface != UNIT_IFACE {
                return None;
            }
            let ts = |k: &str| match changed.get(k).map(|v| &**v) {
                Some(Variant::U64(t)) if *t > 0 => Some(*t),
                _ => None,
            };
            let active_state = match changed.get("ActiveState").map(|v| &**v) {
                Some(Variant::Str(s)) => Some(s.to_string()),
                _ => None,
            };
            Some(Record::Changed {
                host: host.to_string(),
                vm,
                received_us,
                active_state,
                inactive_exit_us: ts("InactiveExitTimestamp"),
                inactive_enter_us: ts("InactiveEnterTimestamp"),
            })
        }
        "UnitRemoved" => {
            let (unit, _path): (String, OwnedObjectPath) = msg.body().deserialize().ok()?;
            let vm = vm_of_unit(&unit)?.to_string();
            Some(Record::Removed {
                host: host.to_string(),
                vm,
                received_us,
            })
        }
        _ => None,
    }
}

/// One host's recording connection. Dropping it stops recording.
#[derive(Debug)]
pub struct Watch {
    host: String,
    conn: zbus::Connection,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Watch {
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The VMs whose units are up on the host now, asked on the recording connection itself:
    /// D-Bus keeps one connection's messages in order, so every signal sent before the answer
    /// has reached the recorder's queue when this returns.
    pub async fn active_vms(&self) -> anyhow::Result<BTreeSet<String>> {
        let states: Vec<&str> = vec![];
        let patterns = vec!["blixard-vm-*"];
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            self.conn.call_method(
                Some(SYSTEMD),
                MANAGER_PATH,
                Some(MANAGER_IFACE),
                "ListUnitsByPatterns",
                &(states, patterns),
            ),
        )
        .await
        .map_err(|_| anyhow::anyhow!("ListUnitsByPatterns on {} timed out", self.host))??;
        type Row = (
            String,
            String,
            String,
            String,
            String,
            String,
            OwnedObjectPath,
            u32,
            String,
            OwnedObjectPath,
        );
        let rows: Vec<Row> = reply.body().deserialize()?;
        Ok(rows
            .into_iter()
            .filter(|r| is_up(&r.3))
            .filter_map(|r| vm_of_unit(&r.0).map(str::to_string))
            .collect())
    }

    /// Waits (up to `deadline`) until the recorder has taken every signal the host sent, after
    /// the host is dead (its bus closed).
    pub async fn finish(&mut self, deadline: Duration) {
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(deadline, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(vm: &str, at: u64, state: &str, exit: u64, enter: u64) -> Record {
        Record::Changed {
            host: "h1".into(),
            vm: vm.into(),
            received_us: at,
            active_state: Some(state.into()),
            inactive_exit_us: (exit > 0).then_some(exit),
            inactive_enter_us: (enter > 0).then_some(enter),
        }
    }

    fn iv(vm: &str, s: u64, e: Option<u64>) -> Interval {
        Interval {
            vm: vm.into(),
            host: "h1".into(),
            start_us: s,
            end_us: e,
        }
    }

    #[test]
    fn unit_paths_decode() {
        assert_eq!(
            unit_of_path("/org/freedesktop/systemd1/unit/blixard_2dvm_2dweb_2d1_2eservice")
                .as_deref(),
            Some("blixard-vm-web-1.service")
        );
        assert_eq!(vm_of_unit("blixard-vm-web-1.service"), Some("web-1"));
        assert_eq!(vm_of_unit("blixard-fence.service"), None);
        assert_eq!(unit_of_path("/org/freedesktop/systemd1"), None);
    }

    #[test]
    fn intervals_table() {
        let removed = |vm: &str, at: u64| Record::Removed {
            host: "h1".into(),
            vm: vm.into(),
            received_us: at,
        };
        let killed = |at: u64| Record::HostEnded {
            host: "h1".into(),
            at_us: at,
        };
        let cases: Vec<(&str, Vec<Record>, Vec<Interval>)> = vec![
            (
                "start, active, stop: systemd's timestamps, not arrival times",
                vec![
                    ch("a", 105, "activating", 100, 0),
                    ch("a", 110, "active", 100, 0),
                    ch("a", 210, "deactivating", 100, 0),
                    ch("a", 260, "inactive", 100, 250),
                    removed("a", 270),
                ],
                vec![iv("a", 100, Some(250))],
            ),
            (
                "still running",
                vec![ch("a", 110, "active", 100, 0)],
                vec![iv("a", 100, None)],
            ),
            (
                "a start and stop folded into one signal",
                vec![ch("a", 300, "failed", 200, 290)],
                vec![iv("a", 200, Some(290))],
            ),
            (
                "a restart whose stop was never seen",
                vec![
                    ch("a", 110, "active", 100, 0),
                    ch("a", 510, "active", 500, 400),
                ],
                vec![iv("a", 100, Some(400)), iv("a", 500, None)],
            ),
            (
                "a repeated inactive signal adds nothing",
                vec![
                    ch("a", 110, "active", 100, 0),
                    ch("a", 260, "inactive", 100, 250),
                    ch("a", 280, "inactive", 100, 250),
                ],
                vec![iv("a", 100, Some(250))],
            ),
            (
                "no timestamps: arrival times",
                vec![ch("a", 110, "active", 0, 0), ch("a", 300, "inactive", 0, 0)],
                vec![iv("a", 110, Some(300))],
            ),
            (
                "removed while up: ends when removed",
                vec![ch("a", 110, "active", 100, 0), removed("a", 400)],
                vec![iv("a", 100, Some(400))],
            ),
            (
                "a host kill ends what is open, and only what started before it",
                vec![
                    ch("a", 110, "active", 100, 0),
                    ch("b", 120, "active", 115, 0),
                    killed(1000),
                    ch("b", 1510, "active", 1500, 0),
                ],
                vec![
                    iv("a", 100, Some(1000)),
                    iv("b", 115, Some(1000)),
                    iv("b", 1500, None),
                ],
            ),
            (
                "a stop seen only after the kill is cut at the kill",
                vec![
                    ch("a", 110, "active", 100, 0),
                    killed(1000),
                    ch("a", 1200, "inactive", 100, 1100),
                ],
                vec![iv("a", 100, Some(1000))],
            ),
            (
                "a restart after GC (timestamps start over from the new unit)",
                vec![
                    ch("a", 110, "active", 100, 0),
                    ch("a", 260, "inactive", 100, 250),
                    removed("a", 270),
                    ch("a", 610, "activating", 600, 0),
                    ch("a", 620, "active", 600, 0),
                ],
                vec![iv("a", 100, Some(250)), iv("a", 600, None)],
            ),
        ];
        for (name, records, want) in cases {
            assert_eq!(intervals(&records), want, "{name}");
        }
    }
}
