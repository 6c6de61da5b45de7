"""`medsr enhance`: an archive prefix -> enhanced images in the input's own form, with a manifest.

Ray Data stages; the model replicas never wait on decoding or encoding:

1. :class:`~medsr_dist.enhance.read.ReadDecode` (CPU tasks): read bytes, content hash, output key; skip what is already done; decode.
2. :class:`~medsr_dist.enhance.replicas.EnhanceReplica` (actor pool of ``min_replicas..max_replicas``; one GPU each when the cluster has GPUs,
   ``cpus_per_replica`` CPUs otherwise; ``auto``: sized from the cluster, :func:`medsr_dist.runtime.size_replicas`): the tiled inference engine with the configured backend. Tiles of the
   images in one batch share model calls; each image leaves the actor as soon as its last tile is blended,
   quantised to its stored sample type (lossless w.r.t. what is written, and 2-4x smaller than float32).
3. :class:`~medsr_dist.enhance.commit.EncodeCommit` (CPU tasks): encode in the input's form with provenance, write the output, score its
   consistency, then write the item's record (only after the output is complete).

Exactly once. An output is keyed by (input content hash, model hash, parameters): its name carries
``output_id(...)``. The item record ``<output>/_manifest/items/<item id>.json`` (item id: relative input key + output
id) exists only for complete outputs, and a rerun skips inputs that have one (and whose output is still there).
Writes are atomic (local: temp file +
rename; S3: an object appears only when its upload completes), so a run killed at any moment leaves complete outputs
or none; started again it redoes only what has no record, writing the same bytes under the same key. Leftover local
temp files of a killed run are removed when the next run starts (one run per output prefix at a time).

Manifests (Parquet, :data:`~medsr_dist.enhance.manifest.MANIFEST_SCHEMA`): ``_manifest/runs/<run id>.parquet`` has one row per input of that
run (a status of :data:`~medsr_dist.enhance.manifest.STATUSES`, with its reason); ``_manifest/manifest.parquet`` has one row per output ever
completed (the previous table + this run's outputs + records of a killed run that this run did not list again), plus
one row per input that needs no new attempt while unchanged (``ignored``; ``quarantined``; ``error`` rows of inputs
that killed their replica, which carry the count of such runs in ``attempts``). Manifests hold input keys: they sit
beside the archive, under its access control. Logs do not (unless ``enhance.log_keys``): they name items by item id.

Hostile input. Before decoding, the header's dimensions (``probe_image``) are held against
``enhance.max_input_pixels`` / ``max_output_pixels``. A non-finite model output is an error and writes nothing. An
input whose batch killed its replica is retried alone in a second pass (its batch-mates with it, each alone); one
that kills its replica alone is counted, across runs, and ``quarantined`` after ``enhance.max_attempts``. A fatal
device (CUDA) error ends the replica's process so Ray starts a fresh one (with a fresh CUDA context). Keys are
normalised; ``..`` and absolute segments are refused; outputs must lie under the output prefix, which is never
listed as input. One run per output prefix: a :class:`~medsr_dist.storage.Lease` at ``_manifest/lease.json``.

Incremental nights: the listing gives each input's size and version (S3 ETag, local mtime); an input whose (key,
size, version) matches its cumulative-manifest row and whose output is still listed is skipped unread.

Modules (one concern each; image and volume items meet in the stages' ``{kind: handler}`` tables, keyed by
:func:`~medsr_dist.enhance.spec.item_kind`):

- :mod:`~medsr_dist.enhance.identity`: output ids (``output_id``), item ids, output keys, item record URIs;
- :mod:`~medsr_dist.enhance.spec`: :class:`~medsr_dist.enhance.spec.JobSpec`, key rules, item kinds, row reasons;
- :mod:`~medsr_dist.enhance.read`, :mod:`~medsr_dist.enhance.replicas` (or :mod:`~medsr_dist.enhance.serve_client`
  with ``enhance.replicas: serve:<app>``), :mod:`~medsr_dist.enhance.commit`: the three stages;
- :mod:`~medsr_dist.enhance.uncertainty`: the diffusion family's std map, one hook;
- :mod:`~medsr_dist.enhance.volumes`: NIfTI volumes and DICOM series as items;
- :mod:`~medsr_dist.enhance.manifest`, :mod:`~medsr_dist.enhance.plan`, :mod:`~medsr_dist.enhance.job` (the
  driver, :func:`~medsr_dist.enhance.job.run_enhance_job`), :mod:`~medsr_dist.enhance.status` (``medsr status``).

Shared with Serve, eval and the DICOMweb client (one layer down): :mod:`medsr_dist.infer.rows`,
:mod:`medsr_dist.infer.consistency`, :mod:`medsr_dist.infer.provenance`, :mod:`medsr_dist.io.phi`.
"""
