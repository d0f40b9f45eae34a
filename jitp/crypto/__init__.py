"""Key material and sealing: master keys, envelope encryption, key rotation, pseudonyms."""
