-- The generation of each org's VM list: bumped by every INSERT, UPDATE and
-- DELETE of one of its VM rows (triggers, so no write path can forget it).
-- GET /v1/vms serves a cached answer while the generation it was built at
-- is still the org's (vm_list.rs); reading it is one primary-key lookup.

CREATE TABLE vm_list_generations (
    org_id      TEXT PRIMARY KEY,
    generation  INTEGER NOT NULL
);

CREATE TRIGGER vms_list_generation_insert AFTER INSERT ON vms
BEGIN
    INSERT INTO vm_list_generations (org_id, generation) VALUES (NEW.org_id, 1)
        ON CONFLICT (org_id) DO UPDATE SET generation = generation + 1;
END;

CREATE TRIGGER vms_list_generation_update AFTER UPDATE ON vms
BEGIN
    INSERT INTO vm_list_generations (org_id, generation) VALUES (NEW.org_id, 1)
        ON CONFLICT (org_id) DO UPDATE SET generation = generation + 1;
    INSERT INTO vm_list_generations (org_id, generation)
        SELECT OLD.org_id, 1 WHERE OLD.org_id <> NEW.org_id
        ON CONFLICT (org_id) DO UPDATE SET generation = generation + 1;
END;

CREATE TRIGGER vms_list_generation_delete AFTER DELETE ON vms
BEGIN
    INSERT INTO vm_list_generations (org_id, generation) VALUES (OLD.org_id, 1)
        ON CONFLICT (org_id) DO UPDATE SET generation = generation + 1;
END;
