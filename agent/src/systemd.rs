//! The systemd adapter: the only module that speaks D-Bus (zbus).
//!
//! [`SystemdClient`] lists only what the agent calls: start a transient unit, stop and kill a
//! unit, list the `blixard-vm-*` units, read a unit's status, and watch unit changes. Its
//! implementation, [`Systemd`], drives `org.freedesktop.systemd1` over the system bus (the
//! system manager) or a session bus (a user manager), with hand-written proxies.
//!
//! The calls are idempotent: starting a unit that already exists and stopping one that is not
//! loaded are no-ops. The adapter refuses to start anything but a `blixard-vm-*.service` in
//! `blixard-vms.slice` and the agent's own dead man's switch, `blixard-fence.service`
//! (outside that slice), whatever its caller asks; it stops and kills only VM units.
//! [`SystemdClient::list_vm_units`] reads each unit's generation from its description.
//!
//! Unit changes come from `PropertiesChanged` on unit objects and the manager's `JobRemoved`
//! and `UnitRemoved`, after `Subscribe`: call [`SystemdClient::watch`] before starting
//! anything, or a fast failure can be missed (a VM unit is collected as soon as it ends).

use std::collections::HashMap;
use std::future::Future;

use blixard_api::{vm_name_of_unit, UNIT_PREFIX};
use futures::StreamExt;
use tokio::sync::mpsc;
use zbus::message::Type as MessageType;
use zbus::{Connection, MatchRule, MessageStream, OwnedObjectPath, OwnedVariant, Variant};

use crate::config::SystemdBus;
use crate::reconcile::{ActiveState, ObservedUnit};
use crate::unit_spec::{generation_of_description, PropertyValue, UnitSpec};

const SYSTEMD: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const UNIT_PATH_PREFIX: &str = "/org/freedesktop/systemd1/unit/";
const UNIT_EXISTS: &str = "org.freedesktop.systemd1.UnitExists";
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";

/// Errors of the systemd adapter.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    /// The bus is missing or refused the connection.
    #[error("cannot connect to the {bus} bus at {address}")]
    Connect {
        bus: &'static str,
        address: String,
        #[source]
        source: zbus::Error,
    },
    /// The caller asked for a unit the agent must never touch.
    #[error("refusing to manage {unit}: not a blixard-vm-*.service unit in blixard-vms.slice (nor blixard-fence.service)")]
    NotAVmUnit { unit: String },
    /// A call to the manager failed.
    #[error("{call} {unit} failed")]
    Call {
        call: &'static str,
        unit: String,
        #[source]
        source: zbus::Error,
    },
}

impl SystemdError {
    /// The D-Bus error message of a failed call, if that is what it was.
    pub fn dbus_message(&self) -> Option<String> {
        match self {
            SystemdError::Call {
                source: zbus::Error::MethodError(_, msg, _),
                ..
            } => msg.clone(),
            _ => None,
        }
    }
}

/// What `start_transient_unit` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// A start job was queued.
    Started { job: String },
    /// A unit of that name exists already (running or ending): nothing was done.
    AlreadyExists,
}

/// What `stop_unit` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// A stop job was queued.
    Stopping { job: String },
    /// No such unit is loaded: nothing to stop.
    NotLoaded,
}

/// A unit's current status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitStatus {
    pub unit: String,
    pub active_state: String,
    pub sub_state: String,
    /// 0 when no main process runs.
    pub main_pid: u32,
    /// `success`, `exit-code`, `signal`, …
    pub result: String,
    pub exec_main_code: i32,
    pub exec_main_status: i32,
}

/// Some properties of a unit changed. Only what changed is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitChange {
    pub active_state: Option<String>,
    pub sub_state: Option<String>,
    pub result: Option<String>,
    pub main_pid: Option<u32>,
    pub exec_main_code: Option<i32>,
    pub exec_main_status: Option<i32>,
}

/// A change to a `blixard-vm-*` unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitEvent {
    /// `PropertiesChanged` on the unit (its `Unit` or `Service` interface).
    Changed { unit: String, change: UnitChange },
    /// A job of the unit finished with `result` (`done`, `failed`, `canceled`, …).
    JobRemoved {
        unit: String,
        job: String,
        result: String,
    },
    /// The unit was unloaded (collected).
    Removed { unit: String },
}

/// Unit changes, in the order systemd sent them; `None` once the bus connection is gone.
#[derive(Debug)]
pub struct UnitEvents {
    rx: mpsc::Receiver<UnitEvent>,
}

impl UnitEvents {
    /// A stream fed by a channel (for fakes and tests of the daemon).
    pub fn from_channel(rx: mpsc::Receiver<UnitEvent>) -> Self {
        UnitEvents { rx }
    }

    pub async fn next(&mut self) -> Option<UnitEvent> {
        self.rx.recv().await
    }

    /// An event if one is queued, without waiting.
    pub fn try_next(&mut self) -> Option<UnitEvent> {
        self.rx.try_recv().ok()
    }
}

/// What the agent needs from systemd, and nothing more.
pub trait SystemdClient: Send + Sync {
    /// Starts `spec` (a VM unit, or the fence unit) as a transient unit (mode `fail`). A unit
    /// of that name that exists already is left alone.
    fn start_transient_unit(
        &self,
        spec: &UnitSpec,
    ) -> impl Future<Output = Result<StartOutcome, SystemdError>> + Send;

    /// Stops a VM unit (mode `replace`); a unit that is not loaded is fine.
    fn stop_unit(
        &self,
        unit: &str,
    ) -> impl Future<Output = Result<StopOutcome, SystemdError>> + Send;

    /// Sends `signal` to every process of a VM unit; `false` if it is not loaded.
    fn kill_unit(
        &self,
        unit: &str,
        signal: i32,
    ) -> impl Future<Output = Result<bool, SystemdError>> + Send;

    /// Every loaded `blixard-vm-*` unit.
    fn list_vm_units(&self)
        -> impl Future<Output = Result<Vec<ObservedUnit>, SystemdError>> + Send;

    /// A unit's status, `None` if it is not loaded.
    fn unit_status(
        &self,
        unit: &str,
    ) -> impl Future<Output = Result<Option<UnitStatus>, SystemdError>> + Send;

    /// Subscribes to unit changes. Events for units that are not `blixard-vm-*` are dropped.
    fn watch(&self) -> impl Future<Output = Result<UnitEvents, SystemdError>> + Send;
}

/// One entry of `ListUnitsByPatterns`: name, description, load state, active state, sub
/// state, followed unit, object path, job id, job type, job path.
type UnitListEntry = (
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

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Variant<'_>)],
        aux: &[(&str, &[(&str, Variant<'_>)])],
    ) -> zbus::Result<OwnedObjectPath>;

    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;

    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;

    fn list_units_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<Vec<UnitListEntry>>;

    fn subscribe(&self) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property(emits_changed_signal = "false"))]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn sub_state(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait Service {
    #[zbus(property(emits_changed_signal = "false"), name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn result(&self) -> zbus::Result<String>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn exec_main_code(&self) -> zbus::Result<i32>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn exec_main_status(&self) -> zbus::Result<i32>;
}

/// The systemd manager behind a D-Bus connection.
#[derive(Debug, Clone)]
pub struct Systemd {
    conn: Connection,
}

/// The address a bus would be reached at, for error messages.
pub fn bus_address(bus: SystemdBus) -> String {
    match bus {
        SystemdBus::System => std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
            .unwrap_or_else(|_| "unix:path=/var/run/dbus/system_bus_socket".into()),
        SystemdBus::Session => std::env::var("DBUS_SESSION_BUS_ADDRESS").unwrap_or_else(|_| {
            match std::env::var("XDG_RUNTIME_DIR") {
                Ok(dir) => format!("unix:path={dir}/bus (DBUS_SESSION_BUS_ADDRESS is not set)"),
                Err(_) => "(neither DBUS_SESSION_BUS_ADDRESS nor XDG_RUNTIME_DIR is set)".into(),
            }
        }),
    }
}

impl Systemd {
    /// Connects to the manager on `bus`, and checks that it answers.
    pub async fn connect(bus: SystemdBus) -> Result<Systemd, SystemdError> {
        let conn = match bus {
            SystemdBus::System => Connection::system().await,
            SystemdBus::Session => Connection::session().await,
        }
        .map_err(|source| SystemdError::Connect {
            bus: bus.as_str(),
            address: bus_address(bus),
            source,
        })?;
        let s = Systemd { conn };
        // A bus without a systemd manager on it is as useless as no bus.
        let probe = async {
            s.manager()
                .await?
                .list_units_by_patterns(&[], &["blixard-vm-*"])
                .await
        };
        probe.await.map_err(|source| SystemdError::Connect {
            bus: bus.as_str(),
            address: bus_address(bus),
            source,
        })?;
        Ok(s)
    }

    /// Connects to the manager at a D-Bus address (`unix:path=…`).
    pub async fn connect_address(address: &str) -> Result<Systemd, SystemdError> {
        let conn = zbus::connection::Builder::address(address)
            .build()
            .await
            .map_err(|source| SystemdError::Connect {
                bus: "given",
                address: address.to_string(),
                source,
            })?;
        Ok(Systemd { conn })
    }

    async fn manager(&self) -> zbus::Result<ManagerProxy<'static>> {
        ManagerProxy::builder(&self.conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
    }
}

fn call_err(call: &'static str, unit: &str) -> impl FnOnce(zbus::Error) -> SystemdError {
    let unit = unit.to_string();
    move |source| SystemdError::Call {
        call,
        unit: unit.to_string(),
        source,
    }
}

fn is_method_error(e: &zbus::Error, name: &str) -> bool {
    matches!(e, zbus::Error::MethodError(n, _, _) if n.as_str() == name)
}

fn is_vm_unit_name(unit: &str) -> bool {
    vm_name_of_unit(unit).is_some()
}

/// The D-Bus value of a unit property.
fn to_variant(value: &PropertyValue) -> Variant<'static> {
    match value {
        PropertyValue::Str(s) => Variant::from(s.clone()),
        PropertyValue::U64(v) => Variant::from(*v),
        PropertyValue::Bool(b) => Variant::from(*b),
        PropertyValue::StrList(v) => Variant::from(v.clone()),
        PropertyValue::BytesList(v) => Variant::from(v.clone()),
        PropertyValue::Exec(cmds) => Variant::from(
            cmds.iter()
                .map(|c| (c.path.clone(), c.argv.clone(), c.ignore_failure))
                .collect::<Vec<_>>(),
        ),
        PropertyValue::U32(v) => Variant::from(*v),
        PropertyValue::I32(v) => Variant::from(*v),
        PropertyValue::StrPairs(v) => Variant::from(v.clone()),
        PropertyValue::NameList(allow, names) => Variant::from((*allow, names.clone())),
        PropertyValue::IpPrefixes(v) => Variant::from(
            v.iter()
                .map(|p| (p.family, p.address.clone(), p.prefix_len))
                .collect::<Vec<_>>(),
        ),
        PropertyValue::ExecEx(cmds) => Variant::from(
            cmds.iter()
                .map(|c| (c.path.clone(), c.argv.clone(), c.flags.clone()))
                .collect::<Vec<_>>(),
        ),
    }
}

impl SystemdClient for Systemd {
    async fn start_transient_unit(&self, spec: &UnitSpec) -> Result<StartOutcome, SystemdError> {
        if !spec.is_vm_unit() && !spec.is_fence_unit() {
            return Err(SystemdError::NotAVmUnit {
                unit: spec.unit.clone(),
            });
        }
        let values: Vec<(&str, Variant<'static>)> = spec
            .properties
            .iter()
            .map(|p| (p.name, to_variant(&p.value)))
            .collect();
        let manager = self
            .manager()
            .await
            .map_err(call_err("StartTransientUnit", &spec.unit))?;
        match manager
            .start_transient_unit(&spec.unit, "fail", &values, &[])
            .await
        {
            Ok(job) => Ok(StartOutcome::Started {
                job: job.as_str().to_string(),
            }),
            Err(e) if is_method_error(&e, UNIT_EXISTS) => Ok(StartOutcome::AlreadyExists),
            Err(e) => Err(call_err("StartTransientUnit", &spec.unit)(e)),
        }
    }

    async fn stop_unit(&self, unit: &str) -> Result<StopOutcome, SystemdError> {
        if !is_vm_unit_name(unit) {
            return Err(SystemdError::NotAVmUnit {
                unit: unit.to_string(),
            });
        }
        let manager = self.manager().await.map_err(call_err("StopUnit", unit))?;
        match manager.stop_unit(unit, "replace").await {
            Ok(job) => Ok(StopOutcome::Stopping {
                job: job.as_str().to_string(),
            }),
            Err(e) if is_method_error(&e, NO_SUCH_UNIT) => Ok(StopOutcome::NotLoaded),
            Err(e) => Err(call_err("StopUnit", unit)(e)),
        }
    }

    async fn kill_unit(&self, unit: &str, signal: i32) -> Result<bool, SystemdError> {
        if !is_vm_unit_name(unit) {
            return Err(SystemdError::NotAVmUnit {
                unit: unit.to_string(),
            });
        }
        let manager = self.manager().await.map_err(call_err("KillUnit", unit))?;
        match manager.kill_unit(unit, "all", signal).await {
            Ok(()) => Ok(true),
            Err(e) if is_method_error(&e, NO_SUCH_UNIT) => Ok(false),
            Err(e) => Err(call_err("KillUnit", unit)(e)),
        }
    }

    async fn list_vm_units(&self) -> Result<Vec<ObservedUnit>, SystemdError> {
        let pattern = format!("{UNIT_PREFIX}*");
        let manager = self
            .manager()
            .await
            .map_err(call_err("ListUnitsByPatterns", &pattern))?;
        let entries = manager
            .list_units_by_patterns(&[], &[pattern.as_str()])
            .await
            .map_err(call_err("ListUnitsByPatterns", &pattern))?;
        let mut units: Vec<ObservedUnit> = entries
            .into_iter()
            .filter_map(|(name, desc, _load, active, sub, ..)| {
                let vm = vm_name_of_unit(&name)?.to_string();
                Some(ObservedUnit {
                    vm,
                    active: ActiveState::parse(&active),
                    sub_state: sub,
                    generation: generation_of_description(&desc),
                })
            })
            .collect();
        units.sort_by(|a, b| a.vm.cmp(&b.vm));
        Ok(units)
    }

    async fn unit_status(&self, unit: &str) -> Result<Option<UnitStatus>, SystemdError> {
        let manager = self.manager().await.map_err(call_err("GetUnit", unit))?;
        let path = match manager.get_unit(unit).await {
            Ok(p) => p,
            Err(e) if is_method_error(&e, NO_SUCH_UNIT) => return Ok(None),
            Err(e) => return Err(call_err("GetUnit", unit)(e)),
        };
        let err = call_err("Get", unit);
        let u = UnitProxy::builder(&self.conn)
            .path(path.clone())
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(call_err("Get", unit))?;
        let s = ServiceProxy::builder(&self.conn)
            .path(path)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(call_err("Get", unit))?;
        let status = async {
            Ok::<_, zbus::Error>(UnitStatus {
                unit: unit.to_string(),
                active_state: u.active_state().await?,
                sub_state: u.sub_state().await?,
                main_pid: s.main_pid().await?,
                result: s.result().await?,
                exec_main_code: s.exec_main_code().await?,
                exec_main_status: s.exec_main_status().await?,
            })
        }
        .await;
        match status {
            Ok(st) => Ok(Some(st)),
            // Collected between GetUnit and Get.
            Err(zbus::Error::FDO(e)) if matches!(*e, zbus::fdo::Error::UnknownObject(_)) => {
                Ok(None)
            }
            Err(e) => Err(err(e)),
        }
    }

    async fn watch(&self) -> Result<UnitEvents, SystemdError> {
        let what = "signals";
        let props_rule = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .sender(SYSTEMD)
            .interface("org.freedesktop.DBus.Properties")
            .member("PropertiesChanged")
            .path_namespace("/org/freedesktop/systemd1/unit")
            .build()
            .map_err(call_err("AddMatch", what))?;
        let manager_rule = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .sender(SYSTEMD)
            .interface("org.freedesktop.systemd1.Manager")
            .path(MANAGER_PATH)
            .build()
            .map_err(call_err("AddMatch", what))?;
        let props = MessageStream::for_match_rule(props_rule, &self.conn, None)
            .await
            .map_err(call_err("AddMatch", what))?;
        let jobs = MessageStream::for_match_rule(manager_rule, &self.conn, None)
            .await
            .map_err(call_err("AddMatch", what))?;
        // Only now that the match rules are in place: ask systemd to send its signals.
        let manager = self.manager().await.map_err(call_err("Subscribe", what))?;
        manager
            .subscribe()
            .await
            .map_err(call_err("Subscribe", what))?;

        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            let mut merged = futures::stream::select(props, jobs);
            while let Some(msg) = merged.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "bad message from systemd: {e}");
                        continue;
                    }
                };
                if let Some(event) = parse_signal(&msg) {
                    if tx.send(event).await.is_err() {
                        break;
                    }
                }
            }
            tracing::debug!("systemd signal stream ended");
        });
        Ok(UnitEvents { rx })
    }
}

fn parse_signal(msg: &zbus::Message) -> Option<UnitEvent> {
    let header = msg.header();
    let member = header.member()?.as_str().to_string();
    match member.as_str() {
        "PropertiesChanged" => {
            let unit = unit_of_path(header.path()?.as_str())?;
            if !is_vm_unit_name(&unit) {
                return None;
            }
            let body = msg.body();
            let (_iface, changed, _invalidated): (
                String,
                HashMap<String, OwnedVariant>,
                Vec<String>,
            ) = body.deserialize().ok()?;
            let change = UnitChange {
                active_state: changed.get("ActiveState").and_then(as_string),
                sub_state: changed.get("SubState").and_then(as_string),
                result: changed.get("Result").and_then(as_string),
                main_pid: changed.get("MainPID").and_then(|v| match &**v {
                    Variant::U32(p) => Some(*p),
                    _ => None,
                }),
                exec_main_code: changed.get("ExecMainCode").and_then(as_i32),
                exec_main_status: changed.get("ExecMainStatus").and_then(as_i32),
            };
            if change == UnitChange::default() {
                return None;
            }
            Some(UnitEvent::Changed { unit, change })
        }
        "JobRemoved" => {
            let (_id, job, unit, result): (u32, OwnedObjectPath, String, String) =
                msg.body().deserialize().ok()?;
            is_vm_unit_name(&unit).then(|| UnitEvent::JobRemoved {
                unit,
                job: job.as_str().to_string(),
                result,
            })
        }
        "UnitRemoved" => {
            let (unit, _path): (String, OwnedObjectPath) = msg.body().deserialize().ok()?;
            is_vm_unit_name(&unit).then_some(UnitEvent::Removed { unit })
        }
        _ => None,
    }
}

fn as_string(v: &OwnedVariant) -> Option<String> {
    match &**v {
        Variant::Str(s) => Some(s.to_string()),
        _ => None,
    }
}

fn as_i32(v: &OwnedVariant) -> Option<i32> {
    match &**v {
        Variant::I32(i) => Some(*i),
        _ => None,
    }
}

/// The unit name of a unit object path (`…/unit/blixard_2dvm_2dweb_2eservice` →
/// `blixard-vm-web.service`): systemd escapes every byte but `[A-Za-z0-9]` as `_xx`.
pub fn unit_of_path(path: &str) -> Option<String> {
    let label = path.strip_prefix(UNIT_PATH_PREFIX)?;
    let bytes = label.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::wire::Type;

    #[test]
    fn unit_paths_decode() {
        let cases = [
            (
                "/org/freedesktop/systemd1/unit/blixard_2dvm_2dweb_2d1_2eservice",
                Some("blixard-vm-web-1.service"),
            ),
            (
                "/org/freedesktop/systemd1/unit/dbus_2esocket",
                Some("dbus.socket"),
            ),
            ("/org/freedesktop/systemd1/unit/_2d", Some("-")),
            ("/org/freedesktop/systemd1/unit/bad_2", None),
            ("/org/freedesktop/systemd1/unit/bad_zz", None),
            ("/org/freedesktop/systemd1/job/12", None),
        ];
        for (path, want) in cases {
            assert_eq!(unit_of_path(path).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn property_values_have_systemds_types() {
        use crate::unit_spec::{ExecCommand, ExecCommandEx, IpPrefix};
        let cases = [
            (PropertyValue::Str("x".into()), "s"),
            (PropertyValue::U64(1), "t"),
            (PropertyValue::Bool(true), "b"),
            (PropertyValue::StrList(vec!["A=1".into()]), "as"),
            (
                PropertyValue::BytesList(vec![b"BLIXARD_VM=web".to_vec()]),
                "aay",
            ),
            (
                PropertyValue::Exec(vec![ExecCommand {
                    path: "/bin/sleep".into(),
                    argv: vec!["/bin/sleep".into(), "1".into()],
                    ignore_failure: false,
                }]),
                "a(sasb)",
            ),
            (PropertyValue::Exec(vec![]), "a(sasb)"),
            (PropertyValue::BytesList(vec![]), "aay"),
            (PropertyValue::U32(0o077), "u"),
            (PropertyValue::I32(1), "i"),
            (
                PropertyValue::StrPairs(vec![("/dev/kvm".into(), "rw".into())]),
                "a(ss)",
            ),
            (PropertyValue::StrPairs(vec![]), "a(ss)"),
            (
                PropertyValue::NameList(true, vec!["@system-service".into()]),
                "(bas)",
            ),
            (PropertyValue::NameList(false, vec![]), "(bas)"),
            (
                PropertyValue::IpPrefixes(vec![IpPrefix {
                    family: 2,
                    address: vec![0; 4],
                    prefix_len: 0,
                }]),
                "a(iayu)",
            ),
            (PropertyValue::IpPrefixes(vec![]), "a(iayu)"),
            (
                PropertyValue::ExecEx(vec![ExecCommandEx {
                    path: "/usr/sbin/ip".into(),
                    argv: vec!["/usr/sbin/ip".into(), "link".into()],
                    flags: vec!["privileged".into()],
                }]),
                "a(sasas)",
            ),
            (PropertyValue::ExecEx(vec![]), "a(sasas)"),
        ];
        for (value, sig) in cases {
            let v = to_variant(&value);
            assert_eq!(v.value_signature().to_string(), sig, "{value:?}");
        }
        // The argument of StartTransientUnit.
        assert_eq!(<(&str, Variant<'_>)>::SIGNATURE.to_string(), "(sv)");
    }
}
