//! The FUSE adapter (the only module that imports fuser): decode, call, reply; errno mapping.
