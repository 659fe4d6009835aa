// The Verda bundle's entry (dist/verda.mjs, built by `npm run build`): what Mello brings over the
// connection and runs there (lib/remote.ts). It answers one call and exits.
import fs from 'node:fs';
import path from 'node:path';
import { backupModelsOnVerda } from './models.ts';
import { answerMello } from './remote.ts';
import { restoreImageOnVerda } from './restore-image.ts';
import { restoreModelsOnVerda } from './restore-models.ts';

// Brought into a private directory of its own (lib/sh/bring-and-run.sh): loaded now, so removed.
const brought = path.dirname(process.argv[1] ?? '');
if (/^comfymulti-verda\.[A-Za-z0-9]{8}$/.test(path.basename(brought)))
  fs.rmSync(brought, { recursive: true, force: true });

await answerMello({
  'backup-models': backupModelsOnVerda,
  'restore-models': restoreModelsOnVerda,
  'restore-image': restoreImageOnVerda,
});
