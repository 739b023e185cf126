//! `check_invariants`: everything that must hold of a state between commands, checked on `MemState`.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::BLOCK_BYTES;

use super::content::sha256;
use super::mem::MemState;
use super::types::{FileKind, Hash, Ino, ROOT_INO};

/// Check the whole state; the error names the first broken invariant.
pub fn check_invariants(m: &MemState) -> Result<(), String> {
    let meta = &m.meta;
    if meta.next_ino == 0 {
        // Not initialised: nothing may exist yet.
        if !m.inodes.is_empty()
            || !m.entries.is_empty()
            || !m.block_map.is_empty()
            || !m.blocks.is_empty()
        {
            return Err("uninitialised state holds data".into());
        }
        return Ok(());
    }
    let root = m.inodes.get(&ROOT_INO).ok_or("no root inode")?;
    if root.kind != FileKind::Dir || root.parent != ROOT_INO {
        return Err("root is not a directory that is its own parent".into());
    }

    // Entries: live targets of the right kind; names counted per inode; cookies unique per parent.
    let mut names: BTreeMap<Ino, u32> = BTreeMap::new();
    let mut subdirs: BTreeMap<Ino, u32> = BTreeMap::new();
    let mut dir_home: BTreeMap<Ino, Ino> = BTreeMap::new();
    let mut cookies: BTreeSet<(Ino, u64)> = BTreeSet::new();
    for ((parent, name), e) in &m.entries {
        let p = m
            .inodes
            .get(parent)
            .ok_or_else(|| format!("entry {name:?} in missing dir {parent}"))?;
        if p.kind != FileKind::Dir {
            return Err(format!("entry {name:?} in non-directory {parent}"));
        }
        if name.is_empty()
            || name.contains(&b'/')
            || name.contains(&0)
            || name == b"."
            || name == b".."
        {
            return Err(format!("bad name {name:?} in {parent}"));
        }
        let target = m
            .inodes
            .get(&e.ino)
            .ok_or_else(|| format!("entry {name:?} in {parent} -> missing {}", e.ino))?;
        if target.kind != e.kind {
            return Err(format!(
                "entry {name:?} in {parent}: kind {:?} but inode is {:?}",
                e.kind, target.kind
            ));
        }
        if e.cookie < 3 || e.cookie >= meta.next_cookie {
            return Err(format!(
                "entry {name:?} in {parent}: cookie {} out of range",
                e.cookie
            ));
        }
        if !cookies.insert((*parent, e.cookie)) {
            return Err(format!("cookie {} repeated in {parent}", e.cookie));
        }
        *names.entry(e.ino).or_default() += 1;
        if e.kind == FileKind::Dir {
            *subdirs.entry(*parent).or_default() += 1;
            if dir_home.insert(e.ino, *parent).is_some() {
                return Err(format!("directory {} has two names", e.ino));
            }
        }
    }

    // Inodes.
    let mut blocks_of: BTreeMap<Ino, u64> = BTreeMap::new();
    for (ino, _) in m.block_map.keys() {
        *blocks_of.entry(*ino).or_default() += 1;
    }
    for (ino, inode) in &m.inodes {
        if inode.ino != *ino || *ino >= meta.next_ino {
            return Err(format!("inode {ino}: bad number"));
        }
        let named = names.get(ino).copied().unwrap_or(0);
        match inode.kind {
            FileKind::Dir => {
                let want = 2 + subdirs.get(ino).copied().unwrap_or(0);
                if inode.nlink != want {
                    return Err(format!("dir {ino}: nlink {} want {want}", inode.nlink));
                }
                if *ino != ROOT_INO {
                    let home = dir_home
                        .get(ino)
                        .ok_or_else(|| format!("dir {ino} has no name"))?;
                    if *home != inode.parent {
                        return Err(format!(
                            "dir {ino}: parent {} but named in {home}",
                            inode.parent
                        ));
                    }
                } else if named != 0 {
                    return Err("root has a name".into());
                }
                if inode.size != 0 || m.orphans.contains_key(ino) {
                    return Err(format!("dir {ino}: size or orphan"));
                }
            }
            _ => {
                if inode.nlink != named {
                    return Err(format!(
                        "inode {ino}: nlink {} but {named} names",
                        inode.nlink
                    ));
                }
                if inode.parent != 0 {
                    return Err(format!("non-dir {ino} has a parent"));
                }
                if (inode.nlink == 0) != m.orphans.contains_key(ino) {
                    return Err(format!(
                        "inode {ino}: nlink {} vs orphan table",
                        inode.nlink
                    ));
                }
            }
        }
        if inode.kind == FileKind::Symlink
            && (inode.size != inode.target.len() as u64 || inode.target.is_empty())
        {
            return Err(format!("symlink {ino}: size/target"));
        }
        if inode.kind != FileKind::Symlink && !inode.target.is_empty() {
            return Err(format!("inode {ino}: target on a non-symlink"));
        }
        if inode.blocks != blocks_of.get(ino).copied().unwrap_or(0) {
            return Err(format!(
                "inode {ino}: blocks {} but {} mapped",
                inode.blocks,
                blocks_of.get(ino).copied().unwrap_or(0)
            ));
        }
        if inode.perm & !0o7777 != 0 {
            return Err(format!("inode {ino}: perm {:o}", inode.perm));
        }
    }

    // No directory cycles: every directory reaches the root through `parent`.
    for (ino, inode) in &m.inodes {
        if inode.kind != FileKind::Dir {
            continue;
        }
        let mut at = *ino;
        let mut steps = 0usize;
        while at != ROOT_INO {
            at = m
                .inodes
                .get(&at)
                .ok_or_else(|| format!("dir {ino}: broken parent chain"))?
                .parent;
            steps += 1;
            if steps > m.inodes.len() {
                return Err(format!("dir {ino}: cycle"));
            }
        }
    }

    // Orphans: nlink 0, someone pending.
    for (ino, o) in &m.orphans {
        let inode = m
            .inodes
            .get(ino)
            .ok_or_else(|| format!("orphan {ino} is not live"))?;
        if inode.nlink != 0 || o.pending.is_empty() {
            return Err(format!(
                "orphan {ino}: nlink {} pending {:?}",
                inode.nlink, o.pending
            ));
        }
    }

    // Locks: only on live inodes, no empty tables, each table canonical.
    for (ino, table) in &m.locks {
        if !m.inodes.contains_key(ino) {
            return Err(format!("locks on inode {ino}, which is not live"));
        }
        if table.is_empty() {
            return Err(format!("empty lock table stored for inode {ino}"));
        }
        table.check().map_err(|e| format!("locks of inode {ino}: {e}"))?;
    }

    // Blocks: refcounts equal references; data hashes to its key; stored canonically within size.
    let mut refs: BTreeMap<Hash, u64> = BTreeMap::new();
    for ((ino, index), hash) in &m.block_map {
        let inode = m
            .inodes
            .get(ino)
            .ok_or_else(|| format!("block map of missing inode {ino}"))?;
        if inode.kind != FileKind::File {
            return Err(format!("block map of non-file {ino}"));
        }
        let data = m
            .blocks
            .get(hash)
            .ok_or_else(|| format!("inode {ino} block {index}: data missing"))?;
        let start = index * BLOCK_BYTES;
        if data.is_empty() || data.last() == Some(&0) || data.len() as u64 > BLOCK_BYTES {
            return Err(format!("inode {ino} block {index}: not canonical"));
        }
        if start + data.len() as u64 > inode.size {
            return Err(format!(
                "inode {ino} block {index}: beyond size {}",
                inode.size
            ));
        }
        *refs.entry(*hash).or_default() += 1;
    }
    if refs != m.block_refs {
        return Err(format!(
            "block refcounts {:?} != references {:?}",
            m.block_refs.len(),
            refs.len()
        ));
    }
    let mut bytes = 0u64;
    for (hash, data) in &m.blocks {
        if sha256(data) != *hash {
            return Err("a block does not hash to its key".into());
        }
        if !refs.contains_key(hash) {
            return Err("an unreferenced block is stored".into());
        }
        bytes += data.len() as u64;
    }

    for (ino, _) in m.xattrs.keys() {
        if !m.inodes.contains_key(ino) {
            return Err(format!("xattr of missing inode {ino}"));
        }
    }

    if meta.inode_count != m.inodes.len() as u64 {
        return Err(format!(
            "inode_count {} != {}",
            meta.inode_count,
            m.inodes.len()
        ));
    }
    if meta.block_count != m.blocks.len() as u64 || meta.block_bytes != bytes {
        return Err(format!(
            "block counters {}/{} != {}/{}",
            meta.block_count,
            meta.block_bytes,
            m.blocks.len(),
            bytes
        ));
    }
    let mut nodes = meta.nodes.clone();
    nodes.dedup();
    if nodes.len() != meta.nodes.len() {
        return Err("nodes repeated".into());
    }
    Ok(())
}
