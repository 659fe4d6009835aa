// The benchmarks' S3 server (s3rver), in a process of its own so that neither the tools under
// test nor the WAN proxy share its event loop. Creates the buckets named as arguments, prints its
// endpoint, and removes its data on SIGTERM. Started with --openssl-legacy-provider: s3rver's
// continuation tokens use DES, and any listing past 1,000 keys needs one.
import { startS3 } from '../test/helpers.ts';

// test/s3rver-fixes.ts (imported by helpers.ts) makes s3rver hold a PUT whole and on disk before it answers.
const s3 = await startS3(process.argv.slice(2));
process.stdout.write(`${s3.endpoint}\n`);
const stop = async () => {
  await s3.stop();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
