//go:build long

package fs_test

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/meridian-db/meridian/internal/testingutil"
)

// TestLong_LockPage grows a database through the mount past 1 GiB, where
// SQLite skips the page holding the lock bytes, and rebuilds it from the
// log byte for byte. Run with `make test-long`.
func TestLong_LockPage(t *testing.T) {
	for _, mode := range []string{"delete", "wal"} {
		t.Run(mode, func(t *testing.T) {
			fsys := testingutil.MustMount(t)
			db := testingutil.MustOpenSQLite(t, filepath.Join(fsys.MountDir, "big.db"), mode)
			if _, err := db.Exec(`CREATE TABLE t (id INTEGER PRIMARY KEY, b BLOB)`); err != nil {
				t.Fatal(err)
			}
			const rowsPerTx = 16
			for size := int64(0); size < 1<<30+64<<20; {
				if _, err := db.Exec(`BEGIN; ` + strings.Repeat(`INSERT INTO t (b) VALUES (randomblob(1048576)); `, rowsPerTx) + `COMMIT`); err != nil {
					t.Fatal(err)
				}
				var pages, pageSize int64
				if err := db.QueryRow(`SELECT page_count, page_size FROM pragma_page_count, pragma_page_size`).Scan(&pages, &pageSize); err != nil {
					t.Fatal(err)
				}
				size = pages * pageSize
			}
			// Change rows on both sides of the lock page, and shrink.
			if _, err := db.Exec(`UPDATE t SET b = randomblob(1000) WHERE id % 7 = 0; DELETE FROM t WHERE id % 11 = 0`); err != nil {
				t.Fatal(err)
			}
			checkLog(t, fsys, "big.db", db, mode == "wal")
			t.Logf("%s: %d transactions, rebuilt byte-identical", mode, fsys.DB("big.db").Pos().TXID)
		})
	}
}
