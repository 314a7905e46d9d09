//! Names and explanations for logs and status: what a failure means for
//! the operator, never a secret.

use super::{IkeCounters, PeerIke};
use crate::config::ike::identity_text;
use crate::ike::crypto::Encr;
use crate::ike::sa::{ErrorNotify, IkeError, Role};

/// Counts a failure by its kind. An answer we refuse counts with the
/// notify it stands for: selectors the peer narrowed to ones we cannot
/// carry as `ts_unacceptable`, a proposal we did not offer as a proposal
/// mismatch (the operator's question is the same: which side's
/// configuration to change).
pub(super) fn count(c: &mut IkeCounters, e: &IkeError) {
    match e {
        IkeError::WeRefused(n) | IkeError::PeerRefused(n) => match n {
            ErrorNotify::AuthenticationFailed => c.auth_failures += 1,
            ErrorNotify::NoProposalChosen => c.proposal_mismatches += 1,
            ErrorNotify::TsUnacceptable => c.ts_unacceptable += 1,
            _ => c.other_failures += 1,
        },
        IkeError::BadAnswer("traffic selectors") => c.ts_unacceptable += 1,
        IkeError::BadAnswer("IKE proposal" | "ESP proposal") => c.proposal_mismatches += 1,
        IkeError::Timeout => c.timeouts += 1,
        IkeError::DeadPeer => c.dead_peers += 1,
        IkeError::Expired => c.expired += 1,
        _ => c.other_failures += 1,
    }
}

pub(super) fn role_name(role: Role) -> &'static str {
    match role {
        Role::Initiator => "initiator",
        Role::Responder => "responder",
    }
}

pub(super) fn encr_name(e: Encr) -> &'static str {
    match e {
        Encr::AesGcm16_128 => "aes128gcm16",
        Encr::AesGcm16_256 => "aes256gcm16",
    }
}

pub(super) fn suite_name(s: crate::ike::proposal::IkeSuite) -> String {
    use crate::ike::crypto::Prf;
    let prf = match s.prf {
        Prf::HmacSha256 => "prfsha256",
        Prf::HmacSha384 => "prfsha384",
        Prf::HmacSha512 => "prfsha512",
    };
    format!("{}-{prf}-{}", encr_name(s.encr), dh_name(s.dh))
}

pub(super) fn dh_name(g: crate::ike::crypto::DhGroup) -> &'static str {
    use crate::ike::crypto::DhGroup;
    match g {
        DhGroup::Curve25519 => "x25519",
        DhGroup::Ecp256 => "ecp256",
    }
}

/// What a failure means for the operator; never a secret.
pub(super) fn explain(p: &PeerIke, e: &IkeError) -> String {
    let ids = format!(
        "our local_id {}, expected remote_id {}",
        identity_text(&p.cfg.ike.local_id),
        identity_text(&p.cfg.ike.remote_id)
    );
    match e {
        IkeError::WeRefused(ErrorNotify::AuthenticationFailed) => format!(
            "authentication failed: the peer's AUTH does not verify with our PSK, or its \
             identity is not the remote_id we expect ({ids}); check that both hosts use the \
             same psk_file contents and matching identities"
        ),
        IkeError::PeerRefused(ErrorNotify::AuthenticationFailed) => format!(
            "the peer refused our authentication (AUTHENTICATION_FAILED): the PSKs differ, or \
             the peer expects another identity than ours ({ids})"
        ),
        IkeError::WeRefused(ErrorNotify::NoProposalChosen)
        | IkeError::PeerRefused(ErrorNotify::NoProposalChosen) => {
            let (ike, esp) = (&p.ike.ike, &p.ike.esp);
            format!(
                "no proposal in common (NO_PROPOSAL_CHOSEN, {}): we allow IKE encryption {:?}, \
                 PRF {:?}, DH {:?} and ESP {:?} (ESN {:?}); make ike_proposals and \
                 esp_proposals overlap on both hosts",
                if matches!(e, IkeError::WeRefused(_)) {
                    "we refused the peer's"
                } else {
                    "the peer refused ours"
                },
                ike.encr,
                ike.prf,
                ike.dh,
                esp.encr,
                esp.esn
            )
        }
        IkeError::Timeout => format!(
            "no answer from the peer at {} after every retransmission: is esptun running \
             there with [peer.ike] for us, and are UDP 500/4500 open between the hosts?",
            p.initiate_via.1
        ),
        other => format!("the IKE SA failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_answers_count_with_the_notify_they_stand_for() {
        let counted = |e: IkeError| {
            let mut c = IkeCounters::default();
            count(&mut c, &e);
            c
        };
        let narrowed = counted(IkeError::BadAnswer("traffic selectors"));
        assert_eq!((narrowed.ts_unacceptable, narrowed.other_failures), (1, 0));
        let notify = counted(IkeError::PeerRefused(ErrorNotify::TsUnacceptable));
        assert_eq!(notify.ts_unacceptable, 1);
        for what in ["IKE proposal", "ESP proposal"] {
            let c = counted(IkeError::BadAnswer(what));
            assert_eq!((c.proposal_mismatches, c.other_failures), (1, 0), "{what}");
        }
        let tunnel = counted(IkeError::BadAnswer("tunnel mode"));
        assert_eq!((tunnel.other_failures, tunnel.ts_unacceptable), (1, 0));
        assert_eq!(counted(IkeError::DeadPeer).dead_peers, 1);
    }
}
