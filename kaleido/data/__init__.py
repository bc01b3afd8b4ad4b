"""Data curation: raw videos -> clips -> captions -> subjects -> references -> cross-paired training shards."""
