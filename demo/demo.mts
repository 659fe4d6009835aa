// `npm run demo`: the scripts on embedded stand-ins, no account and no server of yours. A local
// S3 server (s3rver) on loopback plays R2; a sample tree in .demo/ plays Mello's user files and,
// for backup-verda --quick, Verda itself (VERDA_HOST=local: no SSH).
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, s3Env, startS3, writeTree } from '../test/helpers.ts';
import { makeVerda } from '../test/verda-fixture.ts';

const demo = path.join(ROOT, '.demo');
fs.rmSync(demo, { recursive: true, force: true });
const data = path.join(demo, 'mello/data');
writeTree(data, {
  'user_data/user001/workflows/portrait.json': '{"nodes":[]}',
  'user_data/user001/comfy.settings.json': '{"Comfy.ColorPalette":"dark"}',
  'user_data/user002/workflows/landscape with spaces.json': '{"nodes":[1]}',
  'outputs/user001/ComfyUI_00001_.png': Buffer.alloc(300_000, 7),
  'outputs/user002/ComfyUI_00001_.png': Buffer.alloc(120_000, 9),
  'inputs/reference.jpg': Buffer.alloc(50_000, 3),
});
const verda = makeVerda(path.join(demo, 'verda'));

const s3 = await startS3(['comfy-multi-user-files', 'comfy-multi-cache', 'comfy-multi-model-vault-backup']);
const env: NodeJS.ProcessEnv & { BACKUP_DIR: string } = {
  ...process.env,
  ...s3Env(s3, path.join(demo, 'state')),
  ...verda.env,
  MELLO_DATA_DIR: data,
  VERDA_HOST: 'local',
  BACKUP_DIR: path.join(demo, 'mello/backups/verda'),
};
delete env.AWS_CA_BUNDLE;

// Asynchronous: the S3 server lives in this process and must keep answering.
async function run(script: string, ...args: string[]) {
  console.log(`\n$ ./${script} ${args.join(' ')}`);
  const child = spawn(path.join(ROOT, script), args, { env, stdio: 'inherit' });
  const code = await new Promise((resolve) => child.on('close', resolve));
  if (code !== 0) console.log(`(exit ${code})`);
}

try {
  await run('backup-mello.mts');
  await run('backup-mello.mts', '--quick'); // unchanged: nothing is sent again
  await run('backup-verda.mts', '--quick');
  console.log(`\nR2 stand-in at ${s3.endpoint} now holds:`);
  for (const bucket of ['comfy-multi-user-files', 'comfy-multi-cache']) {
    for (const key of await s3.listKeys(bucket)) console.log(`  r2://${bucket}/${key}`);
  }
  console.log(`\nMello's copy of Verda: ${env.BACKUP_DIR}`);
  for (const name of fs.readdirSync(env.BACKUP_DIR).sort()) console.log(`  ${name}`);
  console.log(`\nThe sample trees are under ${demo}; the S3 server stopped with this demo.`);
} finally {
  await s3.stop();
}
