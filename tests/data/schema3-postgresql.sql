-- A database of schema 3 (ichnode_schema.version = 3), the last schema before migrations, on
-- PostgreSQL 15, as pg_dump --no-owner --no-privileges writes it (load it with psql). Made by the
-- schema-3 code of this repository (storage/ at commit 198c332) with psycopg 3:
-- Database(url, create=True) created the tables, and its storage.state functions recorded the
-- rows: six studies (done; done and purged by retention; processing; failed; waiting for a
-- retry; receiving), their instances, deliveries sent, pending and failed, notifications sent
-- and pending. tests/test_migrations.py loads it.
--
-- PostgreSQL database dump
--

\restrict prCxl0XVQeV0MG2YU23bsJCoPuipCaRgO9RyUZyQUZkLHv1zbawnGc66BPgJahh

-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: deliveries; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.deliveries (
    id integer NOT NULL,
    study_id integer NOT NULL,
    destination character varying(64) NOT NULL,
    kind character varying(8) NOT NULL,
    result_folder text NOT NULL,
    priority_high boolean NOT NULL,
    state character varying(16) NOT NULL,
    attempts integer NOT NULL,
    next_attempt_at timestamp without time zone NOT NULL,
    last_error text,
    created_at timestamp without time zone NOT NULL,
    sent_at timestamp without time zone
);


--
-- Name: deliveries_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.deliveries_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: deliveries_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.deliveries_id_seq OWNED BY public.deliveries.id;


--
-- Name: ichnode_schema; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.ichnode_schema (
    version integer NOT NULL
);


--
-- Name: ichnode_schema_version_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.ichnode_schema_version_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: ichnode_schema_version_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.ichnode_schema_version_seq OWNED BY public.ichnode_schema.version;


--
-- Name: instances; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.instances (
    id integer NOT NULL,
    sop_instance_uid character varying(64) NOT NULL,
    study_id integer NOT NULL,
    series_instance_uid character varying(64) NOT NULL,
    sop_class_uid character varying(64) NOT NULL,
    modality character varying(16) NOT NULL,
    transfer_syntax_uid character varying(64) NOT NULL,
    path text NOT NULL,
    size integer NOT NULL,
    calling_aet character varying(16) NOT NULL,
    received_at timestamp without time zone NOT NULL
);


--
-- Name: instances_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.instances_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: instances_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.instances_id_seq OWNED BY public.instances.id;


--
-- Name: notifications; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.notifications (
    id integer NOT NULL,
    study_id integer NOT NULL,
    url text NOT NULL,
    payload text NOT NULL,
    state character varying(16) NOT NULL,
    attempts integer NOT NULL,
    next_attempt_at timestamp without time zone NOT NULL,
    last_error text,
    created_at timestamp without time zone NOT NULL,
    sent_at timestamp without time zone
);


--
-- Name: notifications_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.notifications_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: notifications_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.notifications_id_seq OWNED BY public.notifications.id;


--
-- Name: studies; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.studies (
    id integer NOT NULL,
    study_instance_uid character varying(64) NOT NULL,
    accession_number character varying(16) NOT NULL,
    state character varying(16) NOT NULL,
    first_received_at timestamp without time zone NOT NULL,
    last_received_at timestamp without time zone NOT NULL,
    instance_count integer NOT NULL,
    claimed_by character varying(128),
    heartbeat_at timestamp without time zone,
    attempts integer NOT NULL,
    retries integer NOT NULL,
    retry_at timestamp without time zone,
    analyses integer NOT NULL,
    purged_at timestamp without time zone,
    verdict character varying(32),
    study_score double precision,
    result_series_uid character varying(64),
    last_error text,
    updated_at timestamp without time zone NOT NULL
);


--
-- Name: studies_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.studies_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: studies_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.studies_id_seq OWNED BY public.studies.id;


--
-- Name: deliveries id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.deliveries ALTER COLUMN id SET DEFAULT nextval('public.deliveries_id_seq'::regclass);


--
-- Name: ichnode_schema version; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.ichnode_schema ALTER COLUMN version SET DEFAULT nextval('public.ichnode_schema_version_seq'::regclass);


--
-- Name: instances id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.instances ALTER COLUMN id SET DEFAULT nextval('public.instances_id_seq'::regclass);


--
-- Name: notifications id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.notifications ALTER COLUMN id SET DEFAULT nextval('public.notifications_id_seq'::regclass);


--
-- Name: studies id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.studies ALTER COLUMN id SET DEFAULT nextval('public.studies_id_seq'::regclass);


--
-- Data for Name: deliveries; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.deliveries (id, study_id, destination, kind, result_folder, priority_high, state, attempts, next_attempt_at, last_error, created_at, sent_at) FROM stdin;
1	1	pacs	sc	results/1.1/1.1.9900	t	SENT	1	2025-03-01 08:01:30	\N	2026-12-01 08:03:00.631103	2025-03-01 08:01:40
2	1	pacs	sr	results/1.1/1.1.9900	t	PENDING	1	2025-03-01 08:01:50	PACS (PACS@10.0.0.5:104) could not be reached	2026-12-01 08:03:00.631109	\N
3	1	pacs	kos	results/1.1/1.1.9900	t	FAILED	2	2025-03-01 08:01:50	PACS refused kos-0001.dcm: status 0xA700	2026-12-01 08:03:00.63111	\N
\.


--
-- Data for Name: ichnode_schema; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.ichnode_schema (version) FROM stdin;
3
\.


--
-- Data for Name: instances; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.instances (id, sop_instance_uid, study_id, series_instance_uid, sop_class_uid, modality, transfer_syntax_uid, path, size, calling_aet, received_at) FROM stdin;
1	1.1.1.0	1	1.1.1	1.2.840.10008.5.1.4.1.1.2	CT	1.2.840.10008.1.2.1	instances/1.1/1.1.1/1.1.1.0.dcm	525312	CT_SCANNER	2025-03-01 08:00:00
2	1.1.1.1	1	1.1.1	1.2.840.10008.5.1.4.1.1.2	CT	1.2.840.10008.1.2.1	instances/1.1/1.1.1/1.1.1.1.dcm	525312	CT_SCANNER	2025-03-01 08:00:01
3	1.1.1.2	1	1.1.1	1.2.840.10008.5.1.4.1.1.2	CT	1.2.840.10008.1.2.1	instances/1.1/1.1.1/1.1.1.2.dcm	525312	CT_SCANNER	2025-03-01 08:00:02
4	1.1.2.1	1	1.1.2	1.2.840.10008.5.1.4.1.1.88.22	SR	1.2.840.10008.1.2.1	instances/1.1/1.1.2/1.1.2.1.dcm	2048	CT_SCANNER	2025-03-01 08:00:03
6	1.3.1.1	3	1.3.1	1.2.840.10008.5.1.4.1.1.2	CT	1.2.840.10008.1.2.1	instances/1.3/1.3.1/1.3.1.1.dcm	525312	CT_SCANNER	2025-03-01 08:00:06
7	1.4.1.1	4	1.4.1	1.2.840.10008.5.1.4.1.1.2	CT	1.2.840.10008.1.2.1	instances/1.4/1.4.1/1.4.1.1.dcm	525312	CT_SCANNER	2025-03-01 08:00:06
8	1.5.1.1	5	1.5.1	1.2.840.10008.5.1.4.1.1.2	CT	1.2.840.10008.1.2.1	instances/1.5/1.5.1/1.5.1.1.dcm	525312	CT_SCANNER	2025-03-01 08:00:06
9	1.6.1.1	6	1.6.1	1.2.840.10008.5.1.4.1.1.2	CT	1.2.840.10008.1.2.1	instances/1.6/1.6.1/1.6.1.1.dcm	525312	CT_SCANNER	2025-03-01 08:05:00
\.


--
-- Data for Name: notifications; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.notifications (id, study_id, url, payload, state, attempts, next_attempt_at, last_error, created_at, sent_at) FROM stdin;
2	1	https://chat.example.org/hooks/b	{"text": "ICH triage: SUSPECTED"}	PENDING	0	2025-03-01 08:01:30	\N	2026-12-01 08:03:00.63326	\N
1	1	https://chat.example.org/hooks/a	{"text": "ICH triage: SUSPECTED"}	SENT	1	2025-03-01 08:01:30	\N	2026-12-01 08:03:00.633255	2025-03-01 08:01:41
\.


--
-- Data for Name: studies; Type: TABLE DATA; Schema: public; Owner: -
--

COPY public.studies (id, study_instance_uid, accession_number, state, first_received_at, last_received_at, instance_count, claimed_by, heartbeat_at, attempts, retries, retry_at, analyses, purged_at, verdict, study_score, result_series_uid, last_error, updated_at) FROM stdin;
3	1.3		PROCESSING	2025-03-01 08:00:06	2025-03-01 08:00:06	1	ct-host:1002:abc123	2025-03-01 08:01:01	1	0	\N	0	\N	\N	\N	\N	\N	2026-12-01 08:03:00.623555
1	1.1	ACC-0001	DONE	2025-03-01 08:00:00	2025-03-01 08:00:03	4	\N	\N	1	0	\N	1	\N	SUSPECTED - PRIORITY	0.9731	1.1.9900	\N	2026-12-01 08:03:00.629745
4	1.4		FAILED	2025-03-01 08:00:06	2025-03-01 08:00:06	1	\N	\N	1	0	\N	0	\N	\N	\N	\N	no axial head CT series: 1 slice, fewer than worker.min_slices = 10 (Zürich scanner)	2026-12-01 08:03:00.636135
5	1.5		READY	2025-03-01 08:00:06	2025-03-01 08:00:06	1	\N	\N	0	1	2025-03-01 08:06:40	0	\N	\N	\N	\N	no space left on the disk of /srv/ichnode writing results	2026-12-01 08:03:00.637356
2	1.2	ACC-0002	DONE	2025-03-01 08:00:05	2025-03-01 08:00:05	1	\N	\N	1	0	\N	1	2025-03-01 08:03:20	not detected	0.0412	1.2.9900	\N	2026-12-01 08:03:00.649468
6	1.6	ACC-0006	RECEIVING	2025-03-01 08:05:00	2025-03-01 08:05:00	1	\N	\N	0	0	\N	0	\N	\N	\N	\N	\N	2026-12-01 08:03:00.651791
\.


--
-- Name: deliveries_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.deliveries_id_seq', 3, true);


--
-- Name: ichnode_schema_version_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.ichnode_schema_version_seq', 1, false);


--
-- Name: instances_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.instances_id_seq', 9, true);


--
-- Name: notifications_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.notifications_id_seq', 2, true);


--
-- Name: studies_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.studies_id_seq', 6, true);


--
-- Name: deliveries deliveries_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.deliveries
    ADD CONSTRAINT deliveries_pkey PRIMARY KEY (id);


--
-- Name: ichnode_schema ichnode_schema_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.ichnode_schema
    ADD CONSTRAINT ichnode_schema_pkey PRIMARY KEY (version);


--
-- Name: instances instances_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.instances
    ADD CONSTRAINT instances_pkey PRIMARY KEY (id);


--
-- Name: instances instances_study_id_series_instance_uid_sop_instance_uid_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.instances
    ADD CONSTRAINT instances_study_id_series_instance_uid_sop_instance_uid_key UNIQUE (study_id, series_instance_uid, sop_instance_uid);


--
-- Name: notifications notifications_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.notifications
    ADD CONSTRAINT notifications_pkey PRIMARY KEY (id);


--
-- Name: studies studies_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.studies
    ADD CONSTRAINT studies_pkey PRIMARY KEY (id);


--
-- Name: ix_deliveries_next_attempt_at; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_deliveries_next_attempt_at ON public.deliveries USING btree (next_attempt_at);


--
-- Name: ix_deliveries_state; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_deliveries_state ON public.deliveries USING btree (state);


--
-- Name: ix_deliveries_study_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_deliveries_study_id ON public.deliveries USING btree (study_id);


--
-- Name: ix_instances_series_instance_uid; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_instances_series_instance_uid ON public.instances USING btree (series_instance_uid);


--
-- Name: ix_instances_sop_instance_uid; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_instances_sop_instance_uid ON public.instances USING btree (sop_instance_uid);


--
-- Name: ix_instances_study_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_instances_study_id ON public.instances USING btree (study_id);


--
-- Name: ix_notifications_next_attempt_at; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_notifications_next_attempt_at ON public.notifications USING btree (next_attempt_at);


--
-- Name: ix_notifications_state; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_notifications_state ON public.notifications USING btree (state);


--
-- Name: ix_notifications_study_id; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_notifications_study_id ON public.notifications USING btree (study_id);


--
-- Name: ix_studies_last_received_at; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_studies_last_received_at ON public.studies USING btree (last_received_at);


--
-- Name: ix_studies_state; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_studies_state ON public.studies USING btree (state);


--
-- Name: ix_studies_study_instance_uid; Type: INDEX; Schema: public; Owner: -
--

CREATE UNIQUE INDEX ix_studies_study_instance_uid ON public.studies USING btree (study_instance_uid);


--
-- Name: deliveries deliveries_study_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.deliveries
    ADD CONSTRAINT deliveries_study_id_fkey FOREIGN KEY (study_id) REFERENCES public.studies(id);


--
-- Name: instances instances_study_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.instances
    ADD CONSTRAINT instances_study_id_fkey FOREIGN KEY (study_id) REFERENCES public.studies(id);


--
-- Name: notifications notifications_study_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.notifications
    ADD CONSTRAINT notifications_study_id_fkey FOREIGN KEY (study_id) REFERENCES public.studies(id);


--
-- PostgreSQL database dump complete
--

\unrestrict prCxl0XVQeV0MG2YU23bsJCoPuipCaRgO9RyUZyQUZkLHv1zbawnGc66BPgJahh

