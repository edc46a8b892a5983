"""The node's persistent Ed25519 identity: data_dir/identity.key, mode 0600.

Promise: the same data_dir always yields the same peer ID. The key file holds the libp2p
protobuf encoding of the private key (what other libp2p implementations write), is created
atomically with O_EXCL so two racing starts cannot both write one, and is refused (not
silently fixed) when group or others can read it, the way ssh treats private keys.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

from fflnode.errors import IdentityError

KEY_FILE = "identity.key"
MAX_KEY_FILE_BYTES = 4096  # an Ed25519 protobuf key is 68 bytes


def load_or_create(data_dir: Path) -> KeyPair:
    """The node's key pair, created on first start."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / KEY_FILE
    try:
        return _load(path)
    except FileNotFoundError:
        pass
    key_pair = create_new_key_pair()
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key_pair.private_key.serialize())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created it meanwhile: use theirs
    except FileExistsError:
        return _load(path)
    finally:
        tmp.unlink(missing_ok=True)
    return key_pair


def _load(path: Path) -> KeyPair:
    st = path.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{path}: identity key is accessible by group/others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run 'chmod 600 {path}'"
        )
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise IdentityError(f"{path}: {st.st_size} bytes is not an identity key")
    try:
        private = deserialize_private_key(path.read_bytes())
    except Exception as e:  # the library raises assorted types on garbage
        raise IdentityError(f"{path}: not a libp2p private key ({type(e).__name__})") from None
    if private.get_type() != KeyType.Ed25519:
        raise IdentityError(f"{path}: key type {private.get_type().name}, expected Ed25519")
    return KeyPair(private, private.get_public_key())


def peer_id_of(key_pair: KeyPair) -> ID:
    return ID.from_pubkey(key_pair.public_key)
