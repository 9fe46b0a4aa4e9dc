//! Starts elections for this node: the only thing that does (openraft 0.9's own election
//! timer is switched off, `enable_elect: false`), so a dead leader is replaced in well under a
//! second and a healthy one is never deposed.
//!
//! Why not openraft's timer: a follower stands only after `leader_lease`
//! (= `election_timeout_max`) *plus* a random election timeout; it adds
//! `2 × election_timeout_max` whenever it saw a greater log in its last campaign, a flag
//! cleared only by its next campaign, so it goes stale and slows the next failover too; and a
//! candidate refused for its short log keeps its self-vote for that term, so the up-to-date
//! follower's campaign in the same term fails and waits out another timeout. Killing the
//! leader under load measured p50 1.9 s, p99 2.9 s that way. Worse, it campaigns without
//! asking: openraft has no pre-vote, and a leader steps down on any higher term it sees, so a
//! follower that merely could not hear the leader for a while (a stalled fsync, a paused
//! process) deposes a leader everyone else hears.
//!
//! What this does, on every voter that does not lead: once no request from a leader
//! *arrived* for `lease + heartbeat + jitter` (contact is recorded on arrival, before the
//! entries reach this node's disk, see [`ControlNode::leader_request_arrived`]), it runs a
//! pre-vote round ([`crate::pre_vote`]): only if a quorum would grant it a vote does it
//! trigger a campaign. The Raft network client reports why real vote requests were refused
//! ([`VoteNews`]), and the pre-vote why it was turned down: a voter with a longer log means
//! this node cannot win, so it waits a few leases and lets that voter campaign; a voter that
//! voted for itself in the same term (two campaigns crossed) means the next term can win, so
//! it retries within a few milliseconds; otherwise it retries after two heartbeats, and after
//! [`FAST_TRIES`] every lease. A node that stops leading counts that moment as contact, so a
//! deposed leader does not campaign at once on a stale clock. Only the timing of elections
//! changes, never their safety.
//!
//! [`decide`] and [`refusal`] are the pure rules; [`run`] feeds them the node's state.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::raft::{VoteRequest, VoteResponse};

use crate::node::ControlNode;
use crate::raft_types::NodeId;

/// Tries two heartbeats apart after a leader went silent; after these, one per lease.
pub const FAST_TRIES: u32 = 6;

/// Why a voter refused this node's vote request; ordered from least to most telling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// A leader lease or a higher term.
    Other,
    /// The voter voted for another candidate (or itself) in the same term.
    SameTermRival,
    /// The voter's log is longer: this node cannot win until it catches up.
    Behind,
}

/// Why `resp` refused `req`, or `None` if it granted it.
pub fn refusal(req: &VoteRequest<NodeId>, resp: &VoteResponse<NodeId>) -> Option<Refusal> {
    if resp.vote_granted {
        return None;
    }
    if resp.last_log_id > req.last_log_id {
        return Some(Refusal::Behind);
    }
    if resp.vote.leader_id().term == req.vote.leader_id().term && resp.vote != req.vote {
        return Some(Refusal::SameTermRival);
    }
    Some(Refusal::Other)
}

/// The most telling refusal since it was last taken: written by the Raft network client,
/// read by [`run`].
#[derive(Debug, Default)]
pub struct VoteNews {
    /// 0 none, 1 other, 2 rival, 3 behind (a higher number wins).
    worst: AtomicU8,
}

impl VoteNews {
    pub fn record(&self, req: &VoteRequest<NodeId>, resp: &VoteResponse<NodeId>) {
        let code = match refusal(req, resp) {
            None => return,
            Some(Refusal::Other) => 1,
            Some(Refusal::SameTermRival) => 2,
            Some(Refusal::Behind) => 3,
        };
        self.worst.fetch_max(code, Ordering::Relaxed);
    }

    /// The refusal recorded since the last call, clearing it.
    pub fn take(&self) -> Option<Refusal> {
        match self.worst.swap(0, Ordering::Relaxed) {
            1 => Some(Refusal::Other),
            2 => Some(Refusal::SameTermRival),
            3 => Some(Refusal::Behind),
            _ => None,
        }
    }
}

/// The timings the rule works with, from the node's Raft configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a voter refuses other candidates after hearing from its leader
    /// (openraft 0.9: `election_timeout_max`).
    pub lease: Duration,
    pub heartbeat: Duration,
}

impl Timing {
    /// Silence after which a campaign can win: every voter's lease has run out (they heard
    /// the same heartbeats, give or take one).
    fn silence_needed(&self, jitter: Duration) -> Duration {
        self.lease + self.heartbeat + jitter
    }

    /// Pause between tries: two heartbeats for the votes to come back (a lease once the fast
    /// tries are used up), a few milliseconds after crossing a rival's campaign in the same
    /// term, or a few leases when a voter's log is longer (it should win, not this node).
    fn retry_after(&self, jitter: Duration, last: Option<Refusal>, tries: u32) -> Duration {
        match last {
            Some(Refusal::SameTermRival) => self.heartbeat / 5 + jitter / 4,
            Some(Refusal::Behind) => 4 * self.lease + jitter,
            _ if tries >= FAST_TRIES => self.lease + jitter,
            _ => 2 * self.heartbeat + jitter,
        }
    }

    /// How often [`run`] looks.
    fn tick(&self) -> Duration {
        (self.heartbeat / 5).max(Duration::from_millis(2))
    }

    /// The range jitter is drawn from, so two followers rarely campaign at the same moment.
    pub fn max_jitter(&self) -> Duration {
        2 * self.heartbeat
    }
}

/// What the node looks like at one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// This node leads.
    pub leading: bool,
    /// This node is a voter in the effective membership.
    pub voter: bool,
    /// Time since the last AppendEntries (or snapshot) from a leader.
    pub silence: Duration,
    /// Time since this rule last triggered a campaign, if it did since that contact.
    pub since_try: Option<Duration>,
    /// Campaigns this rule triggered since that contact.
    pub tries: u32,
    /// Why the last campaign was refused, if it was.
    pub refused: Option<Refusal>,
}

/// Whether to trigger a campaign now; `jitter` is drawn in `0..timing.max_jitter()`.
pub fn decide(v: &View, t: &Timing, jitter: Duration) -> bool {
    if v.leading || !v.voter {
        return false;
    }
    if v.silence < t.silence_needed(jitter) {
        return false;
    }
    match v.since_try {
        Some(since) => since >= t.retry_after(jitter, v.refused, v.tries),
        None => true,
    }
}

/// Runs the rule on `node` every few milliseconds until the task is aborted.
pub async fn run(node: Arc<ControlNode>) {
    let timing = Timing {
        lease: Duration::from_millis(node.config.election_timeout_max_ms),
        heartbeat: Duration::from_millis(node.config.heartbeat_ms),
    };
    let mut tick = tokio::time::interval(timing.tick());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_try: Option<Instant> = None;
    let mut tries = 0u32;
    let mut refused: Option<Refusal> = None;
    let mut jitter = draw(&timing);
    let mut was_leading = false;
    loop {
        tick.tick().await;
        let (leading, voter) = {
            let m = node.raft.metrics();
            let m = m.borrow();
            let voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == node.id);
            (m.current_leader == Some(node.id), voter)
        };
        if was_leading && !leading {
            // Its own leadership is the last word from a leader this node heard.
            node.heard_from_leader();
        }
        was_leading = leading;
        let contact = node.last_leader_contact();
        if let Some(r) = node.vote_news.take() {
            // Keep the most telling refusal of this silence.
            refused = refused.max(Some(r));
        }
        if last_try.is_none_or(|t| contact > t) {
            // A leader spoke since the last campaign (or there was none): start over.
            last_try = None;
            tries = 0;
            refused = None;
        }
        let now = Instant::now();
        let view = View {
            leading,
            voter,
            silence: now.saturating_duration_since(contact),
            since_try: last_try.map(|t| now.saturating_duration_since(t)),
            tries,
            refused,
        };
        if !decide(&view, &timing, jitter) {
            continue;
        }
        last_try = Some(Instant::now());
        tries += 1;
        jitter = draw(&timing);
        match node.pre_vote_round().await {
            Ok(crate::pre_vote::Outcome::Campaign) => {}
            Ok(crate::pre_vote::Outcome::Refused(why)) => {
                tracing::debug!(node_id = node.id, ?why, "pre-vote refused; not campaigning");
                refused = refused.max(Some(match why {
                    Some(crate::pre_vote::PreVoteRefusal::Behind) => Refusal::Behind,
                    _ => Refusal::Other,
                }));
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot run a pre-vote round");
                continue;
            }
        }
        tracing::info!(
            node_id = node.id,
            silence_ms = view.silence.as_millis() as u64,
            try_no = tries,
            last_refusal = ?refused,
            "no word from a leader for {} ms and a quorum would vote for this node; starting an election",
            view.silence.as_millis()
        );
        // This campaign's refusals are news; an older one's are not.
        refused = None;
        let _ = node.vote_news.take();
        if let Err(e) = node.raft.trigger().elect().await {
            tracing::warn!(error = %e, "cannot start an election");
            return;
        }
    }
}

fn draw(t: &Timing) -> Duration {
    let max = t.max_jitter().as_millis().max(1) as u64;
    Duration::from_millis(fastrand::u64(0..max))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        lease: Duration::from_millis(500),
        heartbeat: Duration::from_millis(50),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn follower(silence: u64) -> View {
        View {
            leading: false,
            voter: true,
            silence: ms(silence),
            since_try: None,
            tries: 0,
            refused: None,
        }
    }

    #[test]
    fn decide_table() {
        let cases: &[(&str, View, u64, bool)] = &[
            ("leader heard recently", follower(100), 0, false),
            (
                "silent, but a voter's lease may still hold",
                follower(549),
                0,
                false,
            ),
            ("silent past lease + heartbeat", follower(550), 0, true),
            (
                "jitter pushes the first try later",
                follower(560),
                20,
                false,
            ),
            ("jitter passed", follower(571), 20, true),
            (
                "the leader never triggers",
                View {
                    leading: true,
                    ..follower(5_000)
                },
                0,
                false,
            ),
            (
                "a learner never triggers",
                View {
                    voter: false,
                    ..follower(5_000)
                },
                0,
                false,
            ),
            (
                "too soon after the last try",
                View {
                    since_try: Some(ms(99)),
                    tries: 1,
                    ..follower(700)
                },
                0,
                false,
            ),
            (
                "retry after two heartbeats",
                View {
                    since_try: Some(ms(100)),
                    tries: 1,
                    ..follower(700)
                },
                0,
                true,
            ),
            (
                "a crossed campaign retries within milliseconds",
                View {
                    since_try: Some(ms(10)),
                    tries: 1,
                    refused: Some(Refusal::SameTermRival),
                    ..follower(700)
                },
                0,
                true,
            ),
            (
                "a lease refusal waits two heartbeats",
                View {
                    since_try: Some(ms(10)),
                    tries: 1,
                    refused: Some(Refusal::Other),
                    ..follower(700)
                },
                0,
                false,
            ),
            (
                "behind in the log: leave it to the voter with the longer log for a while",
                View {
                    since_try: Some(ms(1_999)),
                    tries: 1,
                    refused: Some(Refusal::Behind),
                    ..follower(20_000)
                },
                0,
                false,
            ),
            (
                "behind, but that voter did not win within four leases: try again",
                View {
                    since_try: Some(ms(2_000)),
                    tries: 1,
                    refused: Some(Refusal::Behind),
                    ..follower(20_000)
                },
                0,
                true,
            ),
            (
                "fast tries used up: one try per lease",
                View {
                    since_try: Some(ms(499)),
                    tries: FAST_TRIES,
                    ..follower(20_000)
                },
                0,
                false,
            ),
            (
                "fast tries used up, a lease passed: try again (never give up)",
                View {
                    since_try: Some(ms(500)),
                    tries: FAST_TRIES + 20,
                    ..follower(20_000)
                },
                0,
                true,
            ),
        ];
        for (name, view, jitter, want) in cases {
            assert_eq!(decide(view, &T, ms(*jitter)), *want, "{name}");
        }
    }

    fn log(term: u64, index: u64) -> Option<openraft::LogId<NodeId>> {
        Some(openraft::LogId::new(
            openraft::CommittedLeaderId::new(term, 1),
            index,
        ))
    }

    #[test]
    fn refusal_table() {
        use openraft::Vote;
        // This node (2) asks for term 5 with its log at (4, 100).
        let req = VoteRequest::new(Vote::new(5, 2), log(4, 100));
        let cases: &[(&str, VoteResponse<NodeId>, Option<Refusal>)] = &[
            (
                "granted",
                VoteResponse::new(Vote::new(5, 2), log(4, 100), true),
                None,
            ),
            (
                "the voter has a longer log",
                VoteResponse::new(Vote::new_committed(4, 1), log(4, 101), false),
                Some(Refusal::Behind),
            ),
            (
                "the voter has a log of a later term",
                VoteResponse::new(Vote::new(5, 3), log(5, 7), false),
                Some(Refusal::Behind),
            ),
            (
                "the voter voted for itself in term 5",
                VoteResponse::new(Vote::new(5, 3), log(4, 99), false),
                Some(Refusal::SameTermRival),
            ),
            (
                "the voter's leader lease still holds",
                VoteResponse::new(Vote::new_committed(4, 1), log(4, 100), false),
                Some(Refusal::Other),
            ),
            (
                "the voter is in a higher term",
                VoteResponse::new(Vote::new(6, 3), log(4, 100), false),
                Some(Refusal::Other),
            ),
        ];
        for (name, resp, want) in cases {
            assert_eq!(refusal(&req, resp), *want, "{name}");
        }
    }

    #[test]
    fn news_keeps_the_most_telling_refusal_until_taken() {
        use openraft::Vote;
        let news = VoteNews::default();
        let req = VoteRequest::new(Vote::new(5, 2), log(4, 100));
        news.record(
            &req,
            &VoteResponse::new(Vote::new(5, 3), log(4, 100), false),
        );
        news.record(
            &req,
            &VoteResponse::new(Vote::new_committed(4, 1), log(4, 100), false),
        );
        assert_eq!(news.take(), Some(Refusal::SameTermRival));
        assert_eq!(news.take(), None);
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..1_000 {
            assert!(draw(&T) < T.max_jitter());
        }
    }
}
