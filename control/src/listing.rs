//! Paged, filtered lists (`GET /v1/vms`, `GET /v1/hosts`), as a pure function of the state.
//!
//! A page is the first `limit` selected items in name order after the continue token, which
//! is the name of the last item of the previous page. Keyset paging is stable across
//! concurrent writes: every item that exists and is selected for the whole listing is
//! answered exactly once, in order; one created or deleted meanwhile may or may not be. A
//! listing by host walks only that host's VMs (the state's index), not every VM.

use std::ops::Bound;

use blixard_api::{Host, HostSelector, Vm, VmSelector};

use crate::state_machine::ClusterState;

/// One page: the items, and the token for the next page if there are more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// Takes up to `limit` items from `it`; the token is the last one's name if any is left.
fn page<'a, T: Clone + 'a>(
    mut it: impl Iterator<Item = &'a T>,
    limit: usize,
    name: fn(&T) -> &str,
) -> Page<T> {
    let items: Vec<T> = it.by_ref().take(limit).cloned().collect();
    let more = items.len() == limit && it.next().is_some();
    let next = if more {
        items.last().map(|i| name(i).to_string())
    } else {
        None
    };
    Page { items, next }
}

fn after(token: Option<&str>) -> (Bound<&str>, Bound<&str>) {
    match token {
        Some(t) => (Bound::Excluded(t), Bound::Unbounded),
        None => (Bound::Unbounded, Bound::Unbounded),
    }
}

fn vm_name(v: &Vm) -> &str {
    &v.spec.name
}

fn host_id(h: &Host) -> &str {
    &h.id
}

/// The VMs `sel` selects after `token`, at most `limit`.
pub fn vms(s: &ClusterState, sel: &VmSelector, token: Option<&str>, limit: usize) -> Page<Vm> {
    let range = after(token);
    match &sel.host {
        Some(h) => page(
            s.index
                .assigned_range(h, range)
                .filter_map(|n| s.vms.get(n))
                .filter(|v| sel.matches(v)),
            limit,
            vm_name,
        ),
        None => page(
            s.vms
                .range::<str, _>(range)
                .map(|(_, v)| v)
                .filter(|v| sel.matches(v)),
            limit,
            vm_name,
        ),
    }
}

/// The hosts `sel` selects after `token`, at most `limit`.
pub fn hosts(
    s: &ClusterState,
    sel: &HostSelector,
    token: Option<&str>,
    limit: usize,
) -> Page<Host> {
    page(
        s.hosts
            .range::<str, _>(after(token))
            .map(|(_, h)| h)
            .filter(|h| sel.matches(h)),
        limit,
        host_id,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::tests_support::{host_record, running_vm};
    use blixard_api::{HostStatus, VmState};

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for h in ["h1", "h2"] {
            s.hosts.insert(h.into(), host_record(h, HostStatus::Up));
        }
        for i in 0..10 {
            let mut v = running_vm(&format!("vm-{i}"), if i % 2 == 0 { "h1" } else { "h2" });
            if i % 3 == 0 {
                v.spec.labels.insert("tier".into(), "web".into());
            }
            if i == 9 {
                v.host = None;
                v.state = VmState::Pending;
            }
            s.vms.insert(v.spec.name.clone(), v);
        }
        s.reindex(1);
        s
    }

    fn names(p: &Page<Vm>) -> Vec<&str> {
        p.items.iter().map(|v| v.spec.name.as_str()).collect()
    }

    /// Every page in turn, following the tokens.
    fn all_pages(s: &ClusterState, sel: &VmSelector, limit: usize) -> Vec<Vec<String>> {
        let mut out = vec![];
        let mut token: Option<String> = None;
        loop {
            let p = vms(s, sel, token.as_deref(), limit);
            out.push(names(&p).iter().map(|n| n.to_string()).collect());
            match p.next {
                Some(t) => token = Some(t),
                None => return out,
            }
        }
    }

    #[test]
    fn pages_follow_tokens_and_filters_combine() {
        let s = state();
        let all = VmSelector::default();
        assert_eq!(
            all_pages(&s, &all, 4),
            vec![
                vec!["vm-0", "vm-1", "vm-2", "vm-3"],
                vec!["vm-4", "vm-5", "vm-6", "vm-7"],
                vec!["vm-8", "vm-9"]
            ]
        );
        // Exactly a page left: no token after it.
        assert_eq!(all_pages(&s, &all, 5).len(), 2);
        assert_eq!(
            all_pages(&s, &all, 10),
            vec![(0..10).map(|i| format!("vm-{i}")).collect::<Vec<_>>()]
        );
        let on_h1 = VmSelector {
            host: Some("h1".into()),
            ..Default::default()
        };
        assert_eq!(
            all_pages(&s, &on_h1, 2),
            vec![vec!["vm-0", "vm-2"], vec!["vm-4", "vm-6"], vec!["vm-8"]]
        );
        let web_pending = VmSelector {
            state: Some(VmState::Pending),
            labels: [("tier".to_string(), "web".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(all_pages(&s, &web_pending, 3), vec![vec!["vm-9"]]);
        let nowhere = VmSelector {
            host: Some("h9".into()),
            ..Default::default()
        };
        assert_eq!(all_pages(&s, &nowhere, 3), vec![Vec::<String>::new()]);
    }

    #[test]
    fn a_listing_survives_writes_between_pages() {
        let mut s = state();
        let first = vms(&s, &VmSelector::default(), None, 3);
        assert_eq!(names(&first), ["vm-0", "vm-1", "vm-2"]);
        // The last item of the page is deleted, an earlier one too, a new one sorts before
        // the token: the next page goes on after the token all the same.
        for n in ["vm-2", "vm-0"] {
            s.vms.remove(n);
        }
        s.vms.insert("vm-00".into(), running_vm("vm-00", "h1"));
        s.reindex(2);
        let second = vms(&s, &VmSelector::default(), first.next.as_deref(), 3);
        assert_eq!(names(&second), ["vm-3", "vm-4", "vm-5"]);
    }

    #[test]
    fn hosts_page_and_filter_by_status() {
        let mut s = state();
        if let Some(h) = s.hosts.get_mut("h2") {
            h.status = HostStatus::Down;
        }
        let p = hosts(&s, &HostSelector::default(), None, 1);
        assert_eq!(p.items.len(), 1);
        assert_eq!(p.next.as_deref(), Some("h1"));
        let p = hosts(&s, &HostSelector::default(), p.next.as_deref(), 1);
        assert_eq!((p.items[0].id.as_str(), p.next), ("h2", None));
        let down = HostSelector {
            status: Some(HostStatus::Down),
            ..Default::default()
        };
        let p = hosts(&s, &down, None, 10);
        assert_eq!(p.items.len(), 1);
    }
}
