// Starts Debian's Chromium headless, with no network beyond what the page asks for
// (playwright gives it a fresh profile; the flags keep Chromium from calling Google's services at start).
import { chromium } from 'playwright-core';

export async function launch() {
  const executablePath = process.env.LOUPE_TEST_CHROMIUM || '/usr/bin/chromium';
  return chromium.launch({
    executablePath,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}
