"""Side effects: resolving configs from disk/cache/Hub, NVML, from_pretrained, measuring."""
