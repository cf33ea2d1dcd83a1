// Opens a page of the UI in headless Chromium and saves a screenshot, printing the
// console errors: for working on the UI (`node tests/ui/shot.mjs <url> <out.png>`).
import { launch } from './browser.mjs';

const [url, out, width = '1440', height = '900'] = process.argv.slice(2);
const browser = await launch();
const page = await browser.newPage({ viewport: { width: Number(width), height: Number(height) } });
page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') console.log(`console ${m.type()}: ${m.text()}`); });
page.on('pageerror', (e) => console.log(`page error: ${e.message}`));
await page.goto(url);
await page.waitForTimeout(1500);
await page.screenshot({ path: out, fullPage: false });
console.log(`saved ${out}`);
await browser.close();
