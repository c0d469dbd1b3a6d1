-- The generation of each org's VM list: bumped by every INSERT, UPDATE and
-- DELETE of one of its VM rows (a trigger, so no write path, on any control
-- plane, can forget it). GET /v1/vms serves a cached answer while the
-- generation it was built at is still the org's (vm_list.rs); reading it is
-- one primary-key lookup.

CREATE TABLE vm_list_generations (
    org_id      TEXT PRIMARY KEY,
    generation  BIGINT NOT NULL
);

CREATE FUNCTION vms_bump_list_generation() RETURNS trigger AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO vm_list_generations AS g (org_id, generation) VALUES (OLD.org_id, 1)
            ON CONFLICT (org_id) DO UPDATE SET generation = g.generation + 1;
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.org_id <> OLD.org_id) THEN
        INSERT INTO vm_list_generations AS g (org_id, generation) VALUES (NEW.org_id, 1)
            ON CONFLICT (org_id) DO UPDATE SET generation = g.generation + 1;
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER vms_list_generation AFTER INSERT OR UPDATE OR DELETE ON vms
    FOR EACH ROW EXECUTE FUNCTION vms_bump_list_generation();
