//! The API's request parsing: bytes → the JSON body of a `/v1/` request → validation, as the
//! control plane does (`ApiJson<T>` then `validate::*`). Nothing may panic; an accepted value
//! must survive a JSON round trip and validate again the same way.
#![no_main]

use blixard_api::{validate, AddMember, HostRegistration, PlanRequest, UpdateVm, VmSpec};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn round_trip<T>(bytes: &[u8], check: impl Fn(&T) -> bool)
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let Ok(v) = serde_json::from_slice::<T>(bytes) else {
        return;
    };
    let ok = check(&v);
    let text = serde_json::to_vec(&v).expect("a parsed value serializes");
    let back: T = serde_json::from_slice(&text).expect("its own JSON parses");
    assert_eq!(back, v);
    assert_eq!(check(&back), ok);
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the request type, the rest is the body.
    let Some((which, body)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => round_trip::<VmSpec>(body, |s| validate::vm_spec(s).is_ok()),
        1 => round_trip::<HostRegistration>(body, |h| validate::host_registration(h).is_ok()),
        2 => round_trip::<UpdateVm>(body, |u| validate::vm_spec(&u.spec).is_ok()),
        3 => {
            round_trip::<PlanRequest>(body, |p| p.vms.iter().all(|s| validate::vm_spec(s).is_ok()))
        }
        _ => round_trip::<AddMember>(body, |m| validate::add_member(m).is_ok()),
    }
    // Names and labels arrive in paths too.
    if let Ok(s) = std::str::from_utf8(body) {
        let _ = validate::dns_label("name", s);
        let _ = validate::image_path("kernel", s);
    }
});
