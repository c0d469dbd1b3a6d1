-- Services of a VM (`/v1/vms/{id}/services`): a JSON array of
-- {name, port, h2c}, kept with the row so one compare-and-set update changes
-- them together with the firewall the worker enforces.
ALTER TABLE vms ADD COLUMN services TEXT NOT NULL DEFAULT '[]';
