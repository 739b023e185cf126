//! POSIX access control lists, as Linux stores them in the `system.posix_acl_access` and
//! `system.posix_acl_default` extended attributes (the `posix_acl_xattr` format: a 4-byte
//! version, 2, then 8-byte entries `{tag: u16, perm: u16, id: u32}`, little-endian).
//!
//! The kernel checks access against the ACLs itself (the FUSE session asks for `FUSE_POSIX_ACL`);
//! what it leaves to the filesystem is what apply does with these functions: keep the mode and
//! the access ACL in step (a `setfacl` changes the mode, a `chmod` changes the ACL), and give a
//! new file or directory the default ACL of its parent (`posix_acl_create` in Linux).

use super::error::Errno;

/// The access ACL of an inode.
pub const ACL_ACCESS_XATTR: &[u8] = b"system.posix_acl_access";
/// The default ACL of a directory, inherited by what is created in it.
pub const ACL_DEFAULT_XATTR: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
const HEADER_BYTES: usize = 4;
const ENTRY_BYTES: usize = 8;
/// Linux refuses an ACL xattr of more entries than fit in a page (`fuse_set_acl`: E2BIG).
pub const ACL_ENTRIES_MAX: usize = (4096 - HEADER_BYTES) / ENTRY_BYTES;

const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
/// The id of an entry that names no user or group (the owner, owning group, mask, other).
const UNDEFINED_ID: u32 = u32::MAX;

/// One entry: a tag, rwx bits (0-7) and, for named users and groups, the uid or gid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// A valid ACL (as `posix_acl_valid` checks it: one owner, owning group and other entry, named
/// entries in increasing id order without repeats, a mask if there is any named entry, the
/// entries in tag order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<Entry>,
}

impl Acl {
    /// Decode and validate an xattr value; EINVAL if it is not a valid ACL.
    pub fn parse(value: &[u8]) -> Result<Acl, Errno> {
        if value.len() < HEADER_BYTES || (value.len() - HEADER_BYTES) % ENTRY_BYTES != 0 {
            return Err(Errno::Inval);
        }
        let version = u32::from_le_bytes(value[..HEADER_BYTES].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(Errno::Inval);
        }
        let count = (value.len() - HEADER_BYTES) / ENTRY_BYTES;
        if count > ACL_ENTRIES_MAX {
            return Err(Errno::Inval);
        }
        let entries = value[HEADER_BYTES..]
            .chunks_exact(ENTRY_BYTES)
            .map(|e| Entry {
                tag: u16::from_le_bytes([e[0], e[1]]),
                perm: u16::from_le_bytes([e[2], e[3]]),
                id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            })
            .collect();
        let acl = Acl { entries };
        acl.validate()?;
        Ok(acl)
    }

    fn validate(&self) -> Result<(), Errno> {
        // Tags must come in this order; named entries in increasing id order, each id once.
        let rank = |tag| match tag {
            USER_OBJ => Some(0),
            USER => Some(1),
            GROUP_OBJ => Some(2),
            GROUP => Some(3),
            MASK => Some(4),
            OTHER => Some(5),
            _ => None,
        };
        let mut counts = [0usize; 6];
        let mut last: Option<(u8, u32)> = None;
        for e in &self.entries {
            let r = rank(e.tag).ok_or(Errno::Inval)?;
            if e.perm & !7 != 0 {
                return Err(Errno::Inval);
            }
            let named = e.tag == USER || e.tag == GROUP;
            if let Some((lr, lid)) = last {
                if r < lr || (r == lr && (!named || e.id <= lid)) {
                    return Err(Errno::Inval);
                }
            }
            counts[r as usize] += 1;
            last = Some((r, e.id));
        }
        let [user_obj, users, group_obj, groups, mask, other] = counts;
        if user_obj != 1 || group_obj != 1 || other != 1 || mask > 1 || (users + groups > 0 && mask == 0) {
            return Err(Errno::Inval);
        }
        Ok(())
    }

    /// The xattr value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + self.entries.len() * ENTRY_BYTES);
        out.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            let id = if e.tag == USER || e.tag == GROUP { e.id } else { UNDEFINED_ID };
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    fn find(&mut self, tag: u16) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.tag == tag)
    }

    /// Whether the mode bits say all the ACL says (no named entries, no mask).
    pub fn is_mode_only(&self) -> bool {
        self.entries.iter().all(|e| matches!(e.tag, USER_OBJ | GROUP_OBJ | OTHER))
    }

    /// The rwx bits of the mode this ACL implies: owner, mask (or owning group), other
    /// (`posix_acl_equiv_mode`).
    pub fn mode_bits(&self) -> u32 {
        let perm = |tag| self.entries.iter().find(|e| e.tag == tag).map_or(0, |e| e.perm as u32);
        let group = if self.entries.iter().any(|e| e.tag == MASK) { perm(MASK) } else { perm(GROUP_OBJ) };
        (perm(USER_OBJ) << 6) | (group << 3) | perm(OTHER)
    }

    /// A chmod: the owner, mask (or owning group) and other entries take the new mode's bits
    /// (`posix_acl_chmod`).
    pub fn chmod(&mut self, mode: u32) {
        if let Some(e) = self.find(USER_OBJ) {
            e.perm = ((mode >> 6) & 7) as u16;
        }
        let group = if self.entries.iter().any(|e| e.tag == MASK) { MASK } else { GROUP_OBJ };
        if let Some(e) = self.find(group) {
            e.perm = ((mode >> 3) & 7) as u16;
        }
        if let Some(e) = self.find(OTHER) {
            e.perm = (mode & 7) as u16;
        }
    }

    /// A new inode's access ACL from its parent's default ACL (`self`) and the mode it was
    /// created with (`posix_acl_create_masq`): each of the owner, mask (or owning group) and other
    /// entries and the matching mode bits are cut to what both allow. Returns the new rwx bits
    /// and the access ACL, `None` when the mode says it all.
    pub fn inherit(&self, mode: u32) -> (u32, Option<Acl>) {
        let mut acl = self.clone();
        let mut mode = mode & 0o777;
        if let Some(e) = acl.find(USER_OBJ) {
            e.perm &= ((mode >> 6) & 7) as u16;
            mode &= ((e.perm as u32) << 6) | !0o700;
        }
        if let Some(e) = acl.find(OTHER) {
            e.perm &= (mode & 7) as u16;
            mode &= (e.perm as u32) | !0o007;
        }
        let group = if acl.entries.iter().any(|e| e.tag == MASK) { MASK } else { GROUP_OBJ };
        if let Some(e) = acl.find(group) {
            e.perm &= ((mode >> 3) & 7) as u16;
            mode &= ((e.perm as u32) << 3) | !0o070;
        }
        let access = if acl.is_mode_only() { None } else { Some(acl) };
        (mode, access)
    }
}

/// The xattr value of `{tag, perm, id}` entries, valid or not (tests build ACLs from it).
#[cfg(test)]
pub(crate) fn encode_entries(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    Acl { entries: entries.iter().map(|&(tag, perm, id)| Entry { tag, perm, id }).collect() }.encode()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any bytes: decoding never panics, and what decodes encodes to bytes that decode to
        /// the same ACL (the ids of unnamed entries are normalised, nothing else changes).
        #[test]
        fn any_bytes_decode_or_are_refused(header in any::<bool>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut raw = if header { VERSION.to_le_bytes().to_vec() } else { Vec::new() };
            raw.extend_from_slice(&tail);
            if let Ok(a) = Acl::parse(&raw) {
                let again = Acl::parse(&a.encode()).expect("an encoded ACL decodes");
                prop_assert_eq!(&again, &a);
                prop_assert_eq!(a.encode().len(), raw.len());
            }
        }

        /// Well-formed entry lists (any tags, perms and ids): decoding agrees with the rules, and
        /// inheriting never grants more than the mode asked or the default ACL allowed.
        #[test]
        fn valid_acls_round_trip_and_inherit_within_bounds(
            named in proptest::collection::btree_map(any::<u32>(), (0u16..8, any::<bool>()), 0..5),
            base in (0u16..8, 0u16..8, 0u16..8, 0u16..8),
            mode in 0u32..0o1000,
        ) {
            let (uo, go, mask, other) = base;
            let mut entries = vec![Entry { tag: USER_OBJ, perm: uo, id: UNDEFINED_ID }];
            entries.extend(named.iter().filter(|(_, (_, g))| !g).map(|(&id, &(perm, _))| Entry { tag: USER, perm, id }));
            entries.push(Entry { tag: GROUP_OBJ, perm: go, id: UNDEFINED_ID });
            entries.extend(named.iter().filter(|(_, (_, g))| *g).map(|(&id, &(perm, _))| Entry { tag: GROUP, perm, id }));
            if !named.is_empty() {
                entries.push(Entry { tag: MASK, perm: mask, id: UNDEFINED_ID });
            }
            entries.push(Entry { tag: OTHER, perm: other, id: UNDEFINED_ID });
            let acl = Acl { entries };
            let parsed = Acl::parse(&acl.encode()).expect("valid");
            prop_assert_eq!(&parsed, &acl);
            let (bits, access) = acl.inherit(mode);
            prop_assert_eq!(bits & !mode, 0, "more than the mode asked");
            prop_assert_eq!(bits & !acl.mode_bits(), 0, "more than the ACL allows");
            prop_assert_eq!(access.is_some(), !named.is_empty());
            if let Some(access) = access {
                prop_assert_eq!(access.mode_bits(), bits);
            }
        }
    }

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        encode_entries(entries)
    }

    const U: u32 = UNDEFINED_ID;

    #[test]
    fn a_valid_acl_decodes_and_encodes_to_the_same_bytes() {
        let v = acl(&[(USER_OBJ, 6, U), (USER, 6, 65534), (USER, 4, 70000), (GROUP_OBJ, 4, U), (GROUP, 5, 10), (MASK, 6, U), (OTHER, 0, U)]);
        let a = Acl::parse(&v).expect("valid");
        assert_eq!(a.encode(), v);
        assert!(!a.is_mode_only());
        assert_eq!(a.mode_bits(), 0o660);
        let base = acl(&[(USER_OBJ, 7, U), (GROUP_OBJ, 5, U), (OTHER, 1, U)]);
        let b = Acl::parse(&base).expect("valid");
        assert!(b.is_mode_only());
        assert_eq!(b.mode_bits(), 0o751);
    }

    #[test]
    fn invalid_acls_are_refused() {
        let bad = [
            Vec::new(),
            vec![2, 0, 0],
            {
                let mut v = acl(&[(USER_OBJ, 7, U), (GROUP_OBJ, 5, U), (OTHER, 1, U)]);
                v[0] = 1; // version 1
                v
            },
            {
                let mut v = acl(&[(USER_OBJ, 7, U), (GROUP_OBJ, 5, U), (OTHER, 1, U)]);
                v.pop(); // a torn entry
                v
            },
            acl(&[(USER_OBJ, 7, U), (OTHER, 1, U)]),                                // no owning group
            acl(&[(USER_OBJ, 7, U), (GROUP_OBJ, 5, U), (USER, 4, 1), (OTHER, 1, U)]), // out of order
            acl(&[(USER_OBJ, 7, U), (USER, 4, 1), (GROUP_OBJ, 5, U), (OTHER, 1, U)]), // named, no mask
            acl(&[(USER_OBJ, 7, U), (USER, 4, 2), (USER, 4, 1), (GROUP_OBJ, 5, U), (MASK, 7, U), (OTHER, 1, U)]),
            acl(&[(USER_OBJ, 7, U), (USER, 4, 1), (USER, 4, 1), (GROUP_OBJ, 5, U), (MASK, 7, U), (OTHER, 1, U)]),
            acl(&[(USER_OBJ, 8, U), (GROUP_OBJ, 5, U), (OTHER, 1, U)]), // perm beyond rwx
            acl(&[(USER_OBJ, 7, U), (GROUP_OBJ, 5, U), (0x40, 1, U), (OTHER, 1, U)]), // unknown tag
            acl(&[(USER_OBJ, 7, U), (USER_OBJ, 7, U), (GROUP_OBJ, 5, U), (OTHER, 1, U)]),
        ];
        for v in bad {
            assert_eq!(Acl::parse(&v), Err(Errno::Inval), "{v:?}");
        }
    }

    #[test]
    fn chmod_sets_the_owner_mask_and_other_entries() {
        let mut a = Acl::parse(&acl(&[(USER_OBJ, 6, U), (USER, 7, 5), (GROUP_OBJ, 4, U), (MASK, 7, U), (OTHER, 4, U)])).unwrap();
        a.chmod(0o740);
        assert_eq!(a.encode(), acl(&[(USER_OBJ, 7, U), (USER, 7, 5), (GROUP_OBJ, 4, U), (MASK, 4, U), (OTHER, 0, U)]));
        let mut b = Acl::parse(&acl(&[(USER_OBJ, 6, U), (GROUP_OBJ, 4, U), (OTHER, 4, U)])).unwrap();
        b.chmod(0o751);
        assert_eq!(b.encode(), acl(&[(USER_OBJ, 7, U), (GROUP_OBJ, 5, U), (OTHER, 1, U)]));
    }

    #[test]
    fn inheriting_cuts_entries_and_mode_to_what_both_allow() {
        // As Linux: default u::rwx,u:5:rwx,g::r-x,m::rwx,o::r-x; open(0o640) -> mode 0o640,
        // access ACL u::rw-,u:5:rwx,g::r-x,m::r--,o::---.
        let d = Acl::parse(&acl(&[(USER_OBJ, 7, U), (USER, 7, 5), (GROUP_OBJ, 5, U), (MASK, 7, U), (OTHER, 5, U)])).unwrap();
        let (mode, access) = d.inherit(0o640);
        assert_eq!(mode, 0o640);
        assert_eq!(access.unwrap().encode(), acl(&[(USER_OBJ, 6, U), (USER, 7, 5), (GROUP_OBJ, 5, U), (MASK, 4, U), (OTHER, 0, U)]));
        // A default ACL of base entries only: the mode is cut by it, no access ACL.
        let base = Acl::parse(&acl(&[(USER_OBJ, 7, U), (GROUP_OBJ, 5, U), (OTHER, 0, U)])).unwrap();
        assert_eq!(base.inherit(0o777), (0o750, None));
    }
}
