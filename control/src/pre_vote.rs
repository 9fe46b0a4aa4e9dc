//! A pre-vote round before every campaign: would a quorum grant this node a vote now?
//!
//! openraft 0.9 has no pre-vote, and a leader steps down as soon as it sees a higher term in
//! any answer. A follower that cannot hear the leader for a while (its disk stalls, its
//! process was paused) would otherwise campaign, raise its term, and depose a leader that the
//! rest of the cluster hears perfectly well. So [`crate::election_trigger`] first asks every
//! other voter `POST /raft/prevote`: a voter says yes only if it has not heard a leader for a
//! whole lease itself, does not lead, and the candidate's log is at least as long as its own
//! (the same log rule as a real vote). Nothing is written and no term changes; only with a
//! quorum of yeses (counting itself) does the node campaign for real. The real vote still
//! decides safety; this only keeps elections from starting where they cannot help.
//!
//! [`judge`] and [`tally`] are the pure rules; [`ask`] sends the round.

use std::time::Duration;

use openraft::LogId;
use serde::{Deserialize, Serialize};

use crate::raft_types::NodeId;

/// Body of `POST /raft/prevote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    /// The candidate's last log id (accepted, maybe not yet on its disk).
    pub last_log_id: Option<LogId<NodeId>>,
}

/// Why a voter would not grant a vote now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreVoteRefusal {
    /// It leads, or heard its leader within a lease.
    LeaderAlive,
    /// Its log is longer than the candidate's.
    Behind,
}

/// Answer to `POST /raft/prevote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteResponse {
    pub granted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<PreVoteRefusal>,
}

/// What the asked voter knows about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Voter {
    pub leading: bool,
    /// Time since it last heard a leader (on arrival of the leader's request).
    pub silence: Duration,
    /// How long a voter refuses other candidates after hearing its leader.
    pub lease: Duration,
    pub last_log_id: Option<LogId<NodeId>>,
}

/// Whether `voter` would grant `req`'s candidate a vote now.
pub fn judge(req: &PreVoteRequest, voter: &Voter) -> PreVoteResponse {
    let refusal = if voter.leading || voter.silence < voter.lease {
        Some(PreVoteRefusal::LeaderAlive)
    } else if req.last_log_id < voter.last_log_id {
        Some(PreVoteRefusal::Behind)
    } else {
        None
    };
    PreVoteResponse {
        granted: refusal.is_none(),
        refusal,
    }
}

/// The outcome of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A quorum would vote for this node: campaign.
    Campaign,
    /// Not enough yeses; the most telling refusal heard, if any voter answered.
    Refused(Option<PreVoteRefusal>),
}

/// Counts a round: `voters` in the membership (this node included, and it votes for itself),
/// `answers` from those that answered in time.
pub fn tally(voters: usize, answers: &[PreVoteResponse]) -> Outcome {
    let yes = 1 + answers.iter().filter(|a| a.granted).count();
    if 2 * yes > voters {
        Outcome::Campaign
    } else {
        Outcome::Refused(answers.iter().filter_map(|a| a.refusal).max())
    }
}

/// Sends `req` to every `(id, base URL)` in `peers` at once with `http` (the peer client) and
/// returns the answers that came back within `timeout`. An isolated peer (fault injection) or
/// one that does not answer counts as no answer; one without the route (404: an older
/// version, during a rolling upgrade) as a yes.
pub async fn ask(
    http: &reqwest::Client,
    peers: &[(NodeId, String)],
    req: &PreVoteRequest,
    timeout: Duration,
) -> Vec<PreVoteResponse> {
    let calls = peers
        .iter()
        .filter(|(id, _)| !crate::faults::is_isolated(*id))
        .map(|(_, url)| async move {
            let url = format!("{}/raft/prevote", url.trim_end_matches('/'));
            let resp = http
                .post(&url)
                .timeout(timeout)
                .json(req)
                .send()
                .await
                .ok()?;
            if !resp.status().is_success() {
                return None;
            }
            resp.json::<PreVoteResponse>().await.ok()
        });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(term: u64, index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(openraft::CommittedLeaderId::new(term, 1), index))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    const LEASE: Duration = Duration::from_millis(500);

    fn voter(silence: u64, last: Option<LogId<NodeId>>) -> Voter {
        Voter {
            leading: false,
            silence: ms(silence),
            lease: LEASE,
            last_log_id: last,
        }
    }

    #[test]
    fn judge_table() {
        let req = PreVoteRequest {
            candidate: 2,
            last_log_id: log(3, 100),
        };
        use PreVoteRefusal::*;
        let cases: &[(&str, Voter, Option<PreVoteRefusal>)] = &[
            (
                "silent past its lease, same log",
                voter(600, log(3, 100)),
                None,
            ),
            ("silent, shorter log", voter(600, log(3, 90)), None),
            ("silent, older term's log", voter(600, log(2, 200)), None),
            ("silent, empty log", voter(600, None), None),
            (
                "heard its leader recently",
                voter(100, log(3, 100)),
                Some(LeaderAlive),
            ),
            (
                "just inside the lease",
                voter(499, log(3, 100)),
                Some(LeaderAlive),
            ),
            ("exactly a lease", voter(500, log(3, 100)), None),
            ("longer log", voter(600, log(3, 101)), Some(Behind)),
            ("log of a later term", voter(600, log(4, 5)), Some(Behind)),
            (
                "it leads (its own silence means nothing)",
                Voter {
                    leading: true,
                    ..voter(10_000, None)
                },
                Some(LeaderAlive),
            ),
            (
                "a live leader outranks a longer log",
                voter(100, log(3, 200)),
                Some(LeaderAlive),
            ),
        ];
        for (name, v, want) in cases {
            let got = judge(&req, v);
            assert_eq!(got.refusal, *want, "{name}");
            assert_eq!(got.granted, want.is_none(), "{name}");
        }
    }

    fn yes() -> PreVoteResponse {
        PreVoteResponse {
            granted: true,
            refusal: None,
        }
    }

    fn no(r: PreVoteRefusal) -> PreVoteResponse {
        PreVoteResponse {
            granted: false,
            refusal: Some(r),
        }
    }

    #[test]
    fn tally_table() {
        use PreVoteRefusal::*;
        let cases: &[(&str, usize, Vec<PreVoteResponse>, Outcome)] = &[
            ("single voter", 1, vec![], Outcome::Campaign),
            ("3 voters, one yes", 3, vec![yes()], Outcome::Campaign),
            (
                "3 voters, one yes one no",
                3,
                vec![yes(), no(LeaderAlive)],
                Outcome::Campaign,
            ),
            ("3 voters, no answers", 3, vec![], Outcome::Refused(None)),
            (
                "3 voters, both hear the leader",
                3,
                vec![no(LeaderAlive), no(LeaderAlive)],
                Outcome::Refused(Some(LeaderAlive)),
            ),
            (
                "3 voters, one behind, one silent",
                3,
                vec![no(Behind)],
                Outcome::Refused(Some(Behind)),
            ),
            (
                "5 voters, two yes is not enough",
                5,
                vec![yes(), no(LeaderAlive), no(Behind)],
                Outcome::Refused(Some(Behind)),
            ),
            (
                "5 voters, two yes plus self",
                5,
                vec![yes(), yes()],
                Outcome::Campaign,
            ),
            (
                "2 voters, the other silent",
                2,
                vec![],
                Outcome::Refused(None),
            ),
        ];
        for (name, voters, answers, want) in cases {
            assert_eq!(tally(*voters, answers), *want, "{name}");
        }
    }

    #[test]
    fn wire_shapes_are_pinned() {
        let req = PreVoteRequest {
            candidate: 2,
            last_log_id: log(3, 100),
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap_or_default(),
            r#"{"candidate":2,"last_log_id":{"leader_id":{"term":3,"node_id":1},"index":100}}"#
        );
        assert_eq!(
            serde_json::to_string(&no(PreVoteRefusal::LeaderAlive)).unwrap_or_default(),
            r#"{"granted":false,"refusal":"leader_alive"}"#
        );
    }
}
