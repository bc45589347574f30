//! RFC 6962 / RFC 9162 Merkle tree hashing for the tamper-evident audit log:
//! leaf and node hashes, the tree head over a prefix of the log, inclusion
//! and consistency proofs, and their verification (RFC 9162 §2.1.3.2 and
//! §2.1.4.2). Checked against the known answers in `tests/vectors`.

use ring::digest::{Context, SHA256};

pub type Hash = [u8; 32];

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut c = Context::new(&SHA256);
    for p in parts {
        c.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(c.finish().as_ref());
    out
}

/// SHA-256(0x00 || data).
pub fn leaf_hash(data: &[u8]) -> Hash {
    sha256(&[&[0u8], data])
}

/// SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[1u8], left, right])
}

/// The root of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    sha256(&[])
}

/// The largest power of two smaller than `n` (n ≥ 2).
fn split(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// MTH(D[n]) over the leaf hashes.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The root of a growing tree in O(log n) per leaf: the roots of its
/// perfect subtrees, largest (leftmost) first. MTH is their right fold.
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    peaks: Vec<(u32, Hash)>,
    size: u64,
}

impl Frontier {
    pub fn push(&mut self, leaf: Hash) {
        let mut item = (0u32, leaf);
        while let Some(&(h, left)) = self.peaks.last() {
            if h != item.0 {
                break;
            }
            self.peaks.pop();
            item = (h + 1, node_hash(&left, &item.1));
        }
        self.peaks.push(item);
        self.size += 1;
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn root(&self) -> Hash {
        let mut it = self.peaks.iter().rev();
        let Some(&(_, mut acc)) = it.next() else {
            return empty_root();
        };
        for (_, p) in it {
            acc = node_hash(p, &acc);
        }
        acc
    }
}

/// MTH over a range of leaves: what the proofs need from a tree.
trait Subtrees {
    fn mth(&self, lo: usize, hi: usize) -> Hash;
}

impl Subtrees for [Hash] {
    fn mth(&self, lo: usize, hi: usize) -> Hash {
        root(&self[lo..hi])
    }
}

/// PATH(m, D[lo..hi]) from the leaf up, into `out`.
fn path(t: &(impl Subtrees + ?Sized), lo: usize, hi: usize, m: usize, out: &mut Vec<Hash>) {
    let n = hi - lo;
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(t, lo, lo + k, m, out);
        out.push(t.mth(lo + k, hi));
    } else {
        path(t, lo + k, hi, m - k, out);
        out.push(t.mth(lo, lo + k));
    }
}

/// SUBPROOF(m, D[lo..hi], complete) into `out`.
fn subproof(
    t: &(impl Subtrees + ?Sized),
    lo: usize,
    hi: usize,
    m: usize,
    complete: bool,
    out: &mut Vec<Hash>,
) {
    let n = hi - lo;
    if m == n {
        if !complete {
            out.push(t.mth(lo, hi));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(t, lo, lo + k, m, complete, out);
        out.push(t.mth(lo + k, hi));
    } else {
        subproof(t, lo + k, hi, m - k, false, out);
        out.push(t.mth(lo, lo + k));
    }
}

/// PATH(m, D[n]): the audit path of leaf `m`, from the leaf up.
/// `None` when `m` is not a leaf of the tree.
pub fn inclusion_proof(leaves: &[Hash], m: usize) -> Option<Vec<Hash>> {
    if m >= leaves.len() {
        return None;
    }
    let mut out = Vec::new();
    path(leaves, 0, leaves.len(), m, &mut out);
    Some(out)
}

/// PROOF(m, D[n]): that the tree of the first `m` leaves is a prefix of
/// the tree of all of them. `None` unless 0 < m ≤ n.
pub fn consistency_proof(leaves: &[Hash], m: usize) -> Option<Vec<Hash>> {
    if m == 0 || m > leaves.len() {
        return None;
    }
    let mut out = Vec::new();
    subproof(leaves, 0, leaves.len(), m, true, &mut out);
    Some(out)
}

/// A growing tree that keeps the hash of every perfect, aligned subtree
/// (two hashes per leaf in all), so that the root of any prefix and every
/// proof take O(log² n) hash lookups and O(log n) hashing, not O(n).
#[derive(Debug, Clone, Default)]
pub struct Tree {
    /// `levels[k][i]`: the root of leaves `[i·2^k, (i+1)·2^k)`.
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    pub fn push(&mut self, leaf: Hash) {
        let mut item = leaf;
        let mut k = 0;
        loop {
            if self.levels.len() == k {
                self.levels.push(Vec::new());
            }
            let level = &mut self.levels[k];
            level.push(item);
            let n = level.len();
            if n % 2 == 1 {
                return;
            }
            item = node_hash(&level[n - 2], &level[n - 1]);
            k += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.levels.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// MTH of the first `size` leaves (`None` past the end).
    pub fn root(&self, size: usize) -> Option<Hash> {
        (size <= self.len()).then(|| self.mth(0, size))
    }

    /// PATH(m, D[size]); `None` unless `m < size ≤ len`.
    pub fn inclusion_proof(&self, size: usize, m: usize) -> Option<Vec<Hash>> {
        if m >= size || size > self.len() {
            return None;
        }
        let mut out = Vec::new();
        path(self, 0, size, m, &mut out);
        Some(out)
    }

    /// PROOF(m, D[size]); `None` unless `0 < m ≤ size ≤ len`.
    pub fn consistency_proof(&self, size: usize, m: usize) -> Option<Vec<Hash>> {
        if m == 0 || m > size || size > self.len() {
            return None;
        }
        let mut out = Vec::new();
        subproof(self, 0, size, m, true, &mut out);
        Some(out)
    }
}

impl Subtrees for Tree {
    fn mth(&self, lo: usize, hi: usize) -> Hash {
        let n = hi - lo;
        if n == 0 {
            return empty_root();
        }
        if n.is_power_of_two() && lo.is_multiple_of(n) {
            let k = n.trailing_zeros() as usize;
            return self.levels[k][lo >> k];
        }
        let k = split(n);
        node_hash(&self.mth(lo, lo + k), &self.mth(lo + k, hi))
    }
}

/// RFC 9162 §2.1.3.2: does `proof` put `leaf` at `index` of the tree of
/// `size` leaves whose root is `root`?
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// RFC 9162 §2.1.4.2: is the tree of `size1` leaves with root `root1` a
/// prefix of the tree of `size2` leaves with root `root2`? Equal sizes need
/// an empty proof and equal roots.
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    root1: &Hash,
    root2: &Hash,
    proof: &[Hash],
) -> bool {
    if size1 > size2 {
        return false;
    }
    if size1 == size2 {
        return proof.is_empty() && root1 == root2;
    }
    if size1 == 0 {
        // The empty tree is a prefix of every tree.
        return proof.is_empty() && *root1 == empty_root();
    }
    if proof.is_empty() {
        return false;
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if size1.is_power_of_two() {
        path.push(*root1);
    }
    path.extend_from_slice(proof);
    let (mut fnode, mut snode) = (size1 - 1, size2 - 1);
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && fr == *root1 && sr == *root2
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RFC 6962 vectors (transparency-dev/merkle and
    /// google/certificate-transparency, Apache-2.0; provenance in
    /// `tests/vectors/RFC6962-README.md`). Leaf indexes are 0-based.
    const VECTORS: &str = include_str!("../tests/vectors/rfc6962.json");

    fn h(s: &serde_json::Value) -> Hash {
        let bytes = hex::decode(s.as_str().expect("hex string")).expect("hex");
        bytes.try_into().expect("32 bytes")
    }

    fn hashes(v: &serde_json::Value) -> Vec<Hash> {
        v.as_array().expect("array").iter().map(h).collect()
    }

    struct Vectors {
        leaves: Vec<Hash>,
        roots: Vec<(usize, Hash)>,
        inclusion: Vec<(usize, usize, Vec<Hash>)>,
        consistency: Vec<(usize, usize, Vec<Hash>)>,
    }

    fn vectors() -> Vectors {
        let v: serde_json::Value = serde_json::from_str(VECTORS).expect("json");
        let inputs: Vec<Vec<u8>> = v["leaf_inputs"]
            .as_array()
            .expect("inputs")
            .iter()
            .map(|s| hex::decode(s.as_str().expect("str")).expect("hex"))
            .collect();
        let leaves: Vec<Hash> = inputs.iter().map(|d| leaf_hash(d)).collect();
        assert_eq!(leaves, hashes(&v["leaf_hashes"]), "leaf hashes");
        assert_eq!(empty_root(), h(&v["empty_root"]));
        let n = |x: &serde_json::Value| usize::try_from(x.as_u64().expect("n")).expect("usize");
        Vectors {
            leaves,
            roots: v["roots"]
                .as_array()
                .expect("roots")
                .iter()
                .map(|r| (n(&r["tree_size"]), h(&r["root"])))
                .collect(),
            inclusion: v["inclusion_proofs"]
                .as_array()
                .expect("inclusion")
                .iter()
                .map(|p| (n(&p["leaf_index"]), n(&p["tree_size"]), hashes(&p["proof"])))
                .collect(),
            consistency: v["consistency_proofs"]
                .as_array()
                .expect("consistency")
                .iter()
                .map(|p| (n(&p["size1"]), n(&p["size2"]), hashes(&p["proof"])))
                .collect(),
        }
    }

    #[test]
    fn roots_match_the_known_answers() {
        let v = vectors();
        assert_eq!(v.roots.len(), 9);
        for (size, want) in &v.roots {
            assert_eq!(root(&v.leaves[..*size]), *want, "root of {size}");
        }
    }

    #[test]
    fn inclusion_proofs_match_verify_and_fail_when_altered() {
        let v = vectors();
        assert!(!v.inclusion.is_empty());
        for (index, size, want) in &v.inclusion {
            let tree = &v.leaves[..*size];
            let proof = inclusion_proof(tree, *index).expect("in range");
            assert_eq!(&proof, want, "PATH({index}, {size})");
            let r = root(tree);
            let (i, s) = (*index as u64, *size as u64);
            assert!(verify_inclusion(i, s, &v.leaves[*index], &proof, &r));
            // Altered: another leaf, index, size, root, or proof.
            let other = v.leaves[(*index + 1) % 8];
            assert!(!verify_inclusion(i, s, &other, &proof, &r));
            assert!(!verify_inclusion(s, s, &v.leaves[*index], &proof, &r));
            let mut bad_root = r;
            bad_root[0] ^= 1;
            assert!(!verify_inclusion(
                i,
                s,
                &v.leaves[*index],
                &proof,
                &bad_root
            ));
            for k in 0..proof.len() {
                let mut bad = proof.clone();
                bad[k][31] ^= 0x80;
                assert!(!verify_inclusion(i, s, &v.leaves[*index], &bad, &r));
            }
            let mut longer = proof.clone();
            longer.push(r);
            assert!(!verify_inclusion(i, s, &v.leaves[*index], &longer, &r));
            if !proof.is_empty() {
                assert!(!verify_inclusion(
                    i,
                    s,
                    &v.leaves[*index],
                    &proof[..proof.len() - 1],
                    &r
                ));
            }
            if *index > 0 {
                assert!(!verify_inclusion(i - 1, s, &v.leaves[*index], &proof, &r));
            }
        }
        assert!(inclusion_proof(&v.leaves, 8).is_none());
    }

    #[test]
    fn consistency_proofs_match_verify_and_fail_when_altered() {
        let v = vectors();
        assert!(!v.consistency.is_empty());
        for (m, n, want) in &v.consistency {
            let proof = consistency_proof(&v.leaves[..*n], *m).expect("in range");
            assert_eq!(&proof, want, "PROOF({m}, {n})");
            let (r1, r2) = (root(&v.leaves[..*m]), root(&v.leaves[..*n]));
            let (a, b) = (*m as u64, *n as u64);
            assert!(verify_consistency(a, b, &r1, &r2, &proof));
            let mut bad = r1;
            bad[5] ^= 1;
            assert!(!verify_consistency(a, b, &bad, &r2, &proof));
            assert!(!verify_consistency(a, b, &r1, &bad, &proof));
            assert!(!verify_consistency(b, a, &r2, &r1, &proof) || a == b);
            for k in 0..proof.len() {
                let mut p = proof.clone();
                p[k][0] ^= 1;
                assert!(!verify_consistency(a, b, &r1, &r2, &p));
            }
            // (A size is bound to its root by the signed tree head, not by
            // the proof: the same path can fit a neighbouring size.)
            if a != b {
                assert!(!verify_consistency(a, b, &r1, &r2, &[]));
            }
        }
    }

    #[test]
    fn the_frontier_gives_every_prefix_root() {
        let v = vectors();
        let mut f = Frontier::default();
        assert_eq!(f.root(), empty_root());
        for (i, leaf) in v.leaves.iter().enumerate() {
            f.push(*leaf);
            assert_eq!(f.root(), v.roots[i + 1].1, "root of {}", i + 1);
        }
        let leaves: Vec<Hash> = (0u32..300).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut f = Frontier::default();
        for (i, l) in leaves.iter().enumerate() {
            f.push(*l);
            assert_eq!(f.root(), root(&leaves[..=i]));
        }
        assert_eq!(f.size(), 300);
    }

    #[test]
    fn the_kept_tree_gives_the_same_roots_and_proofs_as_the_leaves() {
        let leaves: Vec<Hash> = (0u32..70).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut tree = Tree::default();
        assert_eq!(tree.root(0), Some(empty_root()));
        for (i, l) in leaves.iter().enumerate() {
            tree.push(*l);
            assert_eq!(tree.len(), i + 1);
        }
        for n in 0..=leaves.len() {
            assert_eq!(tree.root(n), Some(root(&leaves[..n])), "root of {n}");
            for m in 0..=n {
                assert_eq!(
                    tree.inclusion_proof(n, m),
                    inclusion_proof(&leaves[..n], m),
                    "path {m} of {n}"
                );
                assert_eq!(
                    tree.consistency_proof(n, m),
                    consistency_proof(&leaves[..n], m),
                    "consistency {m} of {n}"
                );
            }
        }
        assert_eq!(tree.root(71), None);
        assert_eq!(tree.inclusion_proof(71, 0), None);
    }

    #[test]
    fn every_prefix_of_a_larger_log_is_consistent_and_every_leaf_included() {
        let leaves: Vec<Hash> = (0u32..37).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        for n in 1..=leaves.len() {
            let tree = &leaves[..n];
            let r = root(tree);
            for (i, leaf) in tree.iter().enumerate() {
                let p = inclusion_proof(tree, i).expect("proof");
                assert!(verify_inclusion(i as u64, n as u64, leaf, &p, &r));
            }
            for m in 1..=n {
                let p = consistency_proof(tree, m).expect("proof");
                assert!(
                    verify_consistency(m as u64, n as u64, &root(&leaves[..m]), &r, &p),
                    "{m} → {n}"
                );
            }
        }
    }
}
