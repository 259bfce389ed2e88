package fs

// SetFailpoint makes operation name of f fail with what fn returns for it
// (nil: no failure); nil removes it. Names: "wal-sync", the fsync of a WAL.
func (f *FileSystem) SetFailpoint(fn func(name string) error) {
	if fn == nil {
		f.failpoint.Store(nil)
		return
	}
	f.failpoint.Store(&fn)
}
