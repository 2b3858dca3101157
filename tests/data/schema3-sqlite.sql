-- A database of schema 3 (ichnode_schema.version = 3), the last schema before migrations, as
-- Python's sqlite3 iterdump() (the sqlite3 shell's .dump) writes it. Made by the schema-3 code of
-- this repository (storage/ at commit 198c332): Database(url, create=True) created the tables,
-- and its storage.state functions recorded the rows: six studies (done; done and purged by
-- retention; processing; failed; waiting for a retry; receiving), their instances, deliveries
-- sent, pending and failed, notifications sent and pending. tests/test_migrations.py loads it.
BEGIN TRANSACTION;
CREATE TABLE deliveries (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	destination VARCHAR(64) NOT NULL, 
	kind VARCHAR(8) NOT NULL, 
	result_folder TEXT NOT NULL, 
	priority_high BOOLEAN NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt_at DATETIME NOT NULL, 
	last_error TEXT, 
	created_at DATETIME NOT NULL, 
	sent_at DATETIME, 
	PRIMARY KEY (id), 
	FOREIGN KEY(study_id) REFERENCES studies (id)
);
INSERT INTO "deliveries" VALUES(1,1,'pacs','sc','results/1.1/1.1.9900',1,'SENT',1,'2025-03-01 08:01:30.000000',NULL,'2026-12-01 08:02:54.622439','2025-03-01 08:01:40.000000');
INSERT INTO "deliveries" VALUES(2,1,'pacs','sr','results/1.1/1.1.9900',1,'PENDING',1,'2025-03-01 08:01:50.000000','PACS (PACS@10.0.0.5:104) could not be reached','2026-12-01 08:02:54.622444',NULL);
INSERT INTO "deliveries" VALUES(3,1,'pacs','kos','results/1.1/1.1.9900',1,'FAILED',2,'2025-03-01 08:01:50.000000','PACS refused kos-0001.dcm: status 0xA700','2026-12-01 08:02:54.622445',NULL);
CREATE TABLE ichnode_schema (
	version INTEGER NOT NULL, 
	PRIMARY KEY (version)
);
INSERT INTO "ichnode_schema" VALUES(3);
CREATE TABLE instances (
	id INTEGER NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	study_id INTEGER NOT NULL, 
	series_instance_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	modality VARCHAR(16) NOT NULL, 
	transfer_syntax_uid VARCHAR(64) NOT NULL, 
	path TEXT NOT NULL, 
	size INTEGER NOT NULL, 
	calling_aet VARCHAR(16) NOT NULL, 
	received_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (study_id, series_instance_uid, sop_instance_uid), 
	FOREIGN KEY(study_id) REFERENCES studies (id)
);
INSERT INTO "instances" VALUES(1,'1.1.1.0',1,'1.1.1','1.2.840.10008.5.1.4.1.1.2','CT','1.2.840.10008.1.2.1','instances/1.1/1.1.1/1.1.1.0.dcm',525312,'CT_SCANNER','2025-03-01 08:00:00.000000');
INSERT INTO "instances" VALUES(2,'1.1.1.1',1,'1.1.1','1.2.840.10008.5.1.4.1.1.2','CT','1.2.840.10008.1.2.1','instances/1.1/1.1.1/1.1.1.1.dcm',525312,'CT_SCANNER','2025-03-01 08:00:01.000000');
INSERT INTO "instances" VALUES(3,'1.1.1.2',1,'1.1.1','1.2.840.10008.5.1.4.1.1.2','CT','1.2.840.10008.1.2.1','instances/1.1/1.1.1/1.1.1.2.dcm',525312,'CT_SCANNER','2025-03-01 08:00:02.000000');
INSERT INTO "instances" VALUES(4,'1.1.2.1',1,'1.1.2','1.2.840.10008.5.1.4.1.1.88.22','SR','1.2.840.10008.1.2.1','instances/1.1/1.1.2/1.1.2.1.dcm',2048,'CT_SCANNER','2025-03-01 08:00:03.000000');
INSERT INTO "instances" VALUES(6,'1.3.1.1',3,'1.3.1','1.2.840.10008.5.1.4.1.1.2','CT','1.2.840.10008.1.2.1','instances/1.3/1.3.1/1.3.1.1.dcm',525312,'CT_SCANNER','2025-03-01 08:00:06.000000');
INSERT INTO "instances" VALUES(7,'1.4.1.1',4,'1.4.1','1.2.840.10008.5.1.4.1.1.2','CT','1.2.840.10008.1.2.1','instances/1.4/1.4.1/1.4.1.1.dcm',525312,'CT_SCANNER','2025-03-01 08:00:06.000000');
INSERT INTO "instances" VALUES(8,'1.5.1.1',5,'1.5.1','1.2.840.10008.5.1.4.1.1.2','CT','1.2.840.10008.1.2.1','instances/1.5/1.5.1/1.5.1.1.dcm',525312,'CT_SCANNER','2025-03-01 08:00:06.000000');
INSERT INTO "instances" VALUES(9,'1.6.1.1',6,'1.6.1','1.2.840.10008.5.1.4.1.1.2','CT','1.2.840.10008.1.2.1','instances/1.6/1.6.1/1.6.1.1.dcm',525312,'CT_SCANNER','2025-03-01 08:05:00.000000');
CREATE TABLE notifications (
	id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	url TEXT NOT NULL, 
	payload TEXT NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt_at DATETIME NOT NULL, 
	last_error TEXT, 
	created_at DATETIME NOT NULL, 
	sent_at DATETIME, 
	PRIMARY KEY (id), 
	FOREIGN KEY(study_id) REFERENCES studies (id)
);
INSERT INTO "notifications" VALUES(1,1,'https://chat.example.org/hooks/a','{"text": "ICH triage: SUSPECTED"}','SENT',1,'2025-03-01 08:01:30.000000',NULL,'2026-12-01 08:02:54.624350','2025-03-01 08:01:41.000000');
INSERT INTO "notifications" VALUES(2,1,'https://chat.example.org/hooks/b','{"text": "ICH triage: SUSPECTED"}','PENDING',0,'2025-03-01 08:01:30.000000',NULL,'2026-12-01 08:02:54.624356',NULL);
CREATE TABLE studies (
	id INTEGER NOT NULL, 
	study_instance_uid VARCHAR(64) NOT NULL, 
	accession_number VARCHAR(16) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	first_received_at DATETIME NOT NULL, 
	last_received_at DATETIME NOT NULL, 
	instance_count INTEGER NOT NULL, 
	claimed_by VARCHAR(128), 
	heartbeat_at DATETIME, 
	attempts INTEGER NOT NULL, 
	retries INTEGER NOT NULL, 
	retry_at DATETIME, 
	analyses INTEGER NOT NULL, 
	purged_at DATETIME, 
	verdict VARCHAR(32), 
	study_score FLOAT, 
	result_series_uid VARCHAR(64), 
	last_error TEXT, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "studies" VALUES(1,'1.1','ACC-0001','DONE','2025-03-01 08:00:00.000000','2025-03-01 08:00:03.000000',4,NULL,NULL,1,0,NULL,1,NULL,'SUSPECTED - PRIORITY',0.9731,'1.1.9900',NULL,'2026-12-01 08:02:54.621684');
INSERT INTO "studies" VALUES(2,'1.2','ACC-0002','DONE','2025-03-01 08:00:05.000000','2025-03-01 08:00:05.000000',1,NULL,NULL,1,0,NULL,1,'2025-03-01 08:03:20.000000','not detected',0.0412,'1.2.9900',NULL,'2026-12-01 08:02:54.636460');
INSERT INTO "studies" VALUES(3,'1.3','','PROCESSING','2025-03-01 08:00:06.000000','2025-03-01 08:00:06.000000',1,'ct-host:1002:abc123','2025-03-01 08:01:01.000000',1,0,NULL,0,NULL,NULL,NULL,NULL,NULL,'2026-12-01 08:02:54.614054');
INSERT INTO "studies" VALUES(4,'1.4','','FAILED','2025-03-01 08:00:06.000000','2025-03-01 08:00:06.000000',1,NULL,NULL,1,0,NULL,0,NULL,NULL,NULL,NULL,'no axial head CT series: 1 slice, fewer than worker.min_slices = 10 (Zürich scanner)','2026-12-01 08:02:54.625900');
INSERT INTO "studies" VALUES(5,'1.5','','READY','2025-03-01 08:00:06.000000','2025-03-01 08:00:06.000000',1,NULL,NULL,0,1,'2025-03-01 08:06:40.000000',0,NULL,NULL,NULL,NULL,'no space left on the disk of /srv/ichnode writing results','2026-12-01 08:02:54.626566');
INSERT INTO "studies" VALUES(6,'1.6','ACC-0006','RECEIVING','2025-03-01 08:05:00.000000','2025-03-01 08:05:00.000000',1,NULL,NULL,0,0,NULL,0,NULL,NULL,NULL,NULL,NULL,'2026-12-01 08:02:54.646712');
CREATE INDEX ix_studies_state ON studies (state);
CREATE UNIQUE INDEX ix_studies_study_instance_uid ON studies (study_instance_uid);
CREATE INDEX ix_studies_last_received_at ON studies (last_received_at);
CREATE INDEX ix_instances_sop_instance_uid ON instances (sop_instance_uid);
CREATE INDEX ix_instances_series_instance_uid ON instances (series_instance_uid);
CREATE INDEX ix_instances_study_id ON instances (study_id);
CREATE INDEX ix_deliveries_next_attempt_at ON deliveries (next_attempt_at);
CREATE INDEX ix_deliveries_study_id ON deliveries (study_id);
CREATE INDEX ix_deliveries_state ON deliveries (state);
CREATE INDEX ix_notifications_state ON notifications (state);
CREATE INDEX ix_notifications_study_id ON notifications (study_id);
CREATE INDEX ix_notifications_next_attempt_at ON notifications (next_attempt_at);
COMMIT;
