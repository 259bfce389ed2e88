package fs

import (
	"bytes"
	"database/sql"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// sqliteWalIndex commits to a WAL-mode database made by SQLite outside
// any mount, with a connection kept open so the wal-index stays, and
// returns the first bytes of its -shm and its WAL.
func sqliteWalIndex(t *testing.T) (shm, wal []byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "app.db")
	db, err := sql.Open("sqlite3", "file:"+path+"?_journal_mode=WAL&_synchronous=FULL")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = db.Close() }()
	db.SetMaxOpenConns(1)
	for _, q := range []string{
		`PRAGMA wal_autocheckpoint = 0`,
		`CREATE TABLE t (b BLOB)`,
		`INSERT INTO t VALUES (randomblob(5000))`,
		`INSERT INTO t VALUES (randomblob(100))`,
	} {
		if _, err := db.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	shm, err = os.ReadFile(path + "-shm")
	if err != nil {
		t.Fatal(err)
	}
	wal, err = os.ReadFile(path + "-wal")
	if err != nil {
		t.Fatal(err)
	}
	return shm[:2*walIndexHeaderSize], wal
}

// TestReadWalIndexHeader reads the wal-index header SQLite wrote: it
// counts every frame of the WAL (all committed, none checkpointed) and
// carries the WAL header's salts. A header being written (the copies
// differ, or the checksum does not match) is busy; one not initialized is
// absent; another version is an error that names it.
func TestReadWalIndexHeader(t *testing.T) {
	shm, wal := sqliteWalIndex(t)
	h, err := parseWALHeader(wal[:walHeaderSize])
	if err != nil {
		t.Fatal(err)
	}
	frames := int64(len(wal)-walHeaderSize) / h.frameSize()
	got, ok, err := readWalIndexHeader(bytes.NewReader(shm))
	if err != nil || !ok {
		t.Fatalf("readWalIndexHeader: ok %v, %v; want a header", ok, err)
	}
	if got.mxFrame != frames || frames < 3 {
		t.Fatalf("mxFrame %d, want %d, the WAL's frames", got.mxFrame, frames)
	}
	if !bytes.Equal(got.salt[:], wal[16:24]) {
		t.Fatalf("salts %x, want %x from the WAL header", got.salt, wal[16:24])
	}

	order := binary.NativeEndian
	for _, tc := range []struct {
		name  string
		edit  func(b []byte)
		ok    bool
		err   error  // errors.Is
		inErr string // or in the message
	}{
		{name: "copies differ", edit: func(b []byte) { b[walIndexHeaderSize+16]++ }, err: errWalIndexBusy},
		{name: "both copies changed, checksum not", edit: func(b []byte) { b[16]++; b[walIndexHeaderSize+16]++ }, err: errWalIndexBusy},
		{name: "not initialized", edit: func(b []byte) { b[12] = 0; b[walIndexHeaderSize+12] = 0 }},
		{name: "short", edit: nil},
		{name: "other version", edit: func(b []byte) {
			order.PutUint32(b[0:], 3007001)
			copy(b[walIndexHeaderSize:], b[:walIndexHeaderSize])
		}, inErr: "version 3007001"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := bytes.Clone(shm)
			if tc.edit == nil {
				b = b[:walIndexHeaderSize+10]
			} else {
				tc.edit(b)
			}
			_, ok, err := readWalIndexHeader(bytes.NewReader(b))
			switch {
			case ok != tc.ok:
				t.Fatalf("ok %v, want %v (%v)", ok, tc.ok, err)
			case tc.err != nil && !errors.Is(err, tc.err):
				t.Fatalf("err %v, want %v", err, tc.err)
			case tc.inErr != "" && (err == nil || !strings.Contains(err.Error(), tc.inErr)):
				t.Fatalf("err %v, want one that says %q", err, tc.inErr)
			case tc.err == nil && tc.inErr == "" && err != nil:
				t.Fatalf("err %v, want none", err)
			}
		})
	}
}

// FuzzReadWalIndexHeader feeds readWalIndexHeader arbitrary -shm
// beginnings: it never panics, and a header it accepts has two equal,
// initialized copies of the known version whose checksum holds.
func FuzzReadWalIndexHeader(f *testing.F) {
	valid := make([]byte, 2*walIndexHeaderSize)
	order := binary.NativeEndian
	order.PutUint32(valid[0:], walIndexVersion)
	valid[12] = 1
	order.PutUint32(valid[16:], 7)
	s1, s2 := walIndexChecksum(valid)
	order.PutUint32(valid[40:], s1)
	order.PutUint32(valid[44:], s2)
	copy(valid[walIndexHeaderSize:], valid[:walIndexHeaderSize])
	f.Add(valid)
	f.Add(valid[:50])
	f.Add(make([]byte, 96))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, ok, err := readWalIndexHeader(bytes.NewReader(b))
		if !ok {
			return
		}
		if err != nil {
			t.Fatalf("ok with error %v", err)
		}
		h1 := b[:walIndexHeaderSize]
		if !bytes.Equal(h1, b[walIndexHeaderSize:2*walIndexHeaderSize]) || h1[12] == 0 || order.Uint32(h1) != walIndexVersion {
			t.Fatalf("accepted a header with unequal copies, not initialized or of another version: %x", b[:2*walIndexHeaderSize])
		}
		if h.mxFrame != int64(order.Uint32(h1[16:])) || !bytes.Equal(h.salt[:], h1[32:40]) {
			t.Fatalf("mxFrame %d, salt %x, not the header's", h.mxFrame, h.salt)
		}
	})
}
