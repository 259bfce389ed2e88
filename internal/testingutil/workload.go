package testingutil

import (
	"database/sql"
	"fmt"
	"math/rand/v2"
)

// Workload runs random write transactions against a SQLite database:
// inserts, updates and deletes of rows with small values and with blobs
// spanning several pages, schema changes (tables, indexes, columns) and
// VACUUMs that shrink the file. It is deterministic for a given seed.
type Workload struct {
	DB  *sql.DB
	Rng *rand.Rand
	// Light keeps each transaction to a few pages, for long runs: rows
	// changed a handful at a time, blobs of one or two pages, a VACUUM one
	// time in 500.
	Light bool

	tables int // tables t0..t(tables-1) exist
}

// NewWorkload returns a workload on db seeded with seed. Call Init first.
func NewWorkload(db *sql.DB, seed uint64) *Workload {
	return &Workload{DB: db, Rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))}
}

// Init creates the first table.
func (w *Workload) Init() error {
	w.tables = 1
	return w.exec(`CREATE TABLE t0 (id INTEGER PRIMARY KEY, k INTEGER, v TEXT, b BLOB)`)
}

// Step runs one random transaction and says what it was.
func (w *Workload) Step() (string, error) {
	if w.Light {
		return w.lightStep()
	}
	switch n := w.Rng.IntN(100); {
	case n < 35:
		return "insert", w.insertRows(20)
	case n < 45:
		// A blob over several pages: overflow page chains.
		return "insert blob", w.exec(fmt.Sprintf(`INSERT INTO %s (k, b) VALUES (?, randomblob(?))`, w.table()), w.Rng.IntN(1e6), 4096+w.Rng.IntN(40000))
	case n < 65:
		return "update", w.exec(fmt.Sprintf(`UPDATE %s SET v = ?, k = k + 1 WHERE id %% ? = ?`, w.table()), w.text(1, 300), w.Rng.IntN(7)+2, w.Rng.IntN(2))
	case n < 80:
		return "delete", w.exec(fmt.Sprintf(`DELETE FROM %s WHERE id %% ? = 0`, w.table()), w.Rng.IntN(5)+2)
	case n < 88:
		return "update blob", w.exec(fmt.Sprintf(`UPDATE %s SET b = randomblob(?) WHERE id IN (SELECT id FROM %[1]s ORDER BY random() LIMIT 3)`, w.table()), w.Rng.IntN(20000))
	case n < 96:
		return "schema", w.schema()
	default:
		return "vacuum", w.exec(`VACUUM`)
	}
}

// insertRows inserts 1 to max rows into a random table in one transaction.
func (w *Workload) insertRows(max int) error {
	return w.tx(func(tx *sql.Tx) error {
		for i := w.Rng.IntN(max) + 1; i > 0; i-- {
			if _, err := tx.Exec(fmt.Sprintf(`INSERT INTO %s (k, v) VALUES (?, ?)`, w.table()), w.Rng.IntN(1e6), w.text(10, 200)); err != nil {
				return err
			}
		}
		return nil
	})
}

// lightStep is Step for a Light workload.
func (w *Workload) lightStep() (string, error) {
	// A few rows from a random id on.
	some := func(t string, n int) string {
		return fmt.Sprintf(`SELECT id FROM %[1]s WHERE id >= (SELECT coalesce(max(id), 0) * %[2]f FROM %[1]s) LIMIT %[3]d`, t, w.Rng.Float64(), n)
	}
	switch n := w.Rng.IntN(1000); {
	case n < 400:
		return "insert", w.insertRows(5)
	case n < 480:
		return "insert blob", w.exec(fmt.Sprintf(`INSERT INTO %s (k, b) VALUES (?, randomblob(?))`, w.table()), w.Rng.IntN(1e6), 4096+w.Rng.IntN(4096))
	case n < 700:
		t := w.table()
		return "update", w.exec(fmt.Sprintf(`UPDATE %s SET v = ?, k = k + 1 WHERE id IN (%s)`, t, some(t, 5)), w.text(1, 300))
	case n < 880:
		t := w.table()
		return "delete", w.exec(fmt.Sprintf(`DELETE FROM %s WHERE id IN (%s)`, t, some(t, 4)))
	case n < 960:
		t := w.table()
		return "update blob", w.exec(fmt.Sprintf(`UPDATE %s SET b = randomblob(?) WHERE id IN (%s)`, t, some(t, 1)), w.Rng.IntN(8000))
	case n < 998:
		return "schema", w.schema()
	default:
		return "vacuum", w.exec(`VACUUM`)
	}
}

// schema makes a random schema change.
func (w *Workload) schema() error {
	switch w.Rng.IntN(4) {
	case 0:
		err := w.exec(fmt.Sprintf(`CREATE TABLE t%d (id INTEGER PRIMARY KEY, k INTEGER, v TEXT, b BLOB)`, w.tables))
		if err == nil {
			w.tables++
		}
		return err
	case 1:
		t := w.table()
		return w.exec(fmt.Sprintf(`CREATE INDEX IF NOT EXISTS %s_k ON %[1]s (k)`, t))
	case 2:
		if w.tables > 1 {
			w.tables--
			return w.exec(fmt.Sprintf(`DROP TABLE t%d`, w.tables))
		}
		return w.exec(`DELETE FROM t0 WHERE id % 2 = 0`)
	default:
		return w.exec(fmt.Sprintf(`ALTER TABLE %s ADD COLUMN c%d TEXT DEFAULT 'x'`, w.table(), w.Rng.IntN(1e9)))
	}
}

func (w *Workload) table() string { return fmt.Sprintf("t%d", w.Rng.IntN(w.tables)) }

func (w *Workload) text(minLen, maxLen int) string {
	b := make([]byte, minLen+w.Rng.IntN(maxLen-minLen+1))
	for i := range b {
		b[i] = 'a' + byte(w.Rng.IntN(26))
	}
	return string(b)
}

func (w *Workload) exec(query string, args ...any) error {
	_, err := w.DB.Exec(query, args...)
	return err
}

func (w *Workload) tx(fn func(*sql.Tx) error) error {
	tx, err := w.DB.Begin()
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	return tx.Commit()
}
