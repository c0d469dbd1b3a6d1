-- The VM's public IPv6 address, reported by its worker once it runs.
ALTER TABLE vms ADD COLUMN public_ipv6 TEXT;
