// Package durable writes files so that they survive a crash or a power
// failure: the data fsynced, and the directory entry too.
package durable

import (
	"errors"
	"os"
	"path/filepath"
)

// SyncDir fsyncs directory dir, so that the entries created, renamed or
// removed in it survive a crash.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	return errors.Join(d.Sync(), d.Close())
}

// WriteFile writes data to the file at path, created or truncated, fsyncs
// it and its directory. A crash part way may leave the file partly
// written: ReplaceFile does not.
func WriteFile(path string, data []byte) error {
	if err := writeSynced(path, data); err != nil {
		return err
	}
	return SyncDir(filepath.Dir(path))
}

// ReplaceFile replaces the file at path with one holding data, whole: it
// writes path+".tmp", fsyncs it, renames it to path and fsyncs the
// directory. A crash leaves the old file or the new one, and perhaps the
// temporary file.
func ReplaceFile(path string, data []byte) error {
	tmp := path + ".tmp"
	err := writeSynced(tmp, data)
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = SyncDir(filepath.Dir(path))
	}
	if err != nil {
		_ = os.Remove(tmp)
	}
	return err
}

// writeSynced writes data to the file at path, created or truncated, and
// fsyncs it.
func writeSynced(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	return errors.Join(err, f.Close())
}
