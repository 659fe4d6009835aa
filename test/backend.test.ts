// The Backend conformance suite (backend-conformance.ts) on the in-memory backend and on
// R2Backend over a real S3 server (s3rver on loopback, taught R2's multipart abort and SigV4).
import { suite } from 'uvu';
import { MiB } from '../lib/files.ts';
import { R2Backend } from '../lib/r2.ts';
import { backendConformance } from './backend-conformance.ts';
import { SECRET, startS3, type S3Server } from './helpers.ts';
import { MemoryBackend } from './memory-backend.ts';

const memory = suite('memory backend');
backendConformance(memory, () => new MemoryBackend(), 11 * MiB, {
  other: () => new MemoryBackend('mem://versions'),
  multipartCopy: true,
  ifMatch: true,
});
memory.run();

const r2 = suite('R2Backend over s3rver');
let s3: S3Server;
let backend: R2Backend;
let versions: R2Backend;
r2.before(async () => {
  s3 = await startS3(['conformance', 'conformance-versions']);
  // Parts of 5 MiB (R2's smallest) so that the big case is three parts.
  backend = new R2Backend(
    { bucket: 'conformance', endpoint: s3.endpoint, accessKeyId: SECRET, secretAccessKey: SECRET },
    { multipartThreshold: 5 * MiB, partSize: 5 * MiB, backoffMs: 20 },
  );
  versions = new R2Backend(
    { bucket: 'conformance-versions', endpoint: s3.endpoint, accessKeyId: SECRET, secretAccessKey: SECRET },
    { backoffMs: 20, attempts: 2 },
  );
});
r2.after(async () => {
  await s3.stop();
});
// s3rver has no UploadPartCopy: every copy is one CopyObject there (the RGW suite copies in parts).
backendConformance(r2, () => backend, 11 * MiB, { other: () => versions, multipartCopy: false, ifMatch: true });
r2.after.each(() => {
  // No multipart upload may be left open by any case.
  const open = [...s3.openUploads('conformance'), ...s3.openUploads('conformance-versions')];
  if (open.length) throw new Error(`multipart uploads left open: ${open.join(', ')}`);
});
r2.run();
