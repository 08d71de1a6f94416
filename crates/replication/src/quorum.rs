//! Quorum arithmetic: a strict majority of the volume's voters (diskful replicas and
//! witnesses, this node included).

/// Whether `reachable` voters (this node included) out of `voters` are a strict majority.
pub fn has_majority(reachable: u8, voters: u8) -> bool {
    voters > 0 && u16::from(reachable) * 2 > u16::from(voters)
}

#[cfg(test)]
mod tests {
    use super::has_majority;

    #[test]
    fn majority_table() {
        // (reachable, voters, quorum)
        let cases = [
            (1, 1, true),
            (1, 2, false),
            (2, 2, true),
            (1, 3, false),
            (2, 3, true),
            (3, 3, true),
            (2, 4, false),
            (3, 4, true),
            (2, 5, false),
            (3, 5, true),
            (0, 0, false),
        ];
        for (r, v, q) in cases {
            assert_eq!(has_majority(r, v), q, "{r} of {v}");
        }
    }

    #[test]
    fn two_disjoint_sides_never_both_have_quorum() {
        for v in 1u8..=32 {
            for a in 0..=v {
                assert!(!(has_majority(a, v) && has_majority(v - a, v)), "{a}/{v}");
            }
        }
    }
}
